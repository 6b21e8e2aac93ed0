"""Training: the loop, optimiser and schedule, batches, metrics; run files are read and written
through `aigc.artifacts`.

Entry point: `aigc.train.loop.train(data_dir, out_dir, ...)`; progress arrives through the
`on_event` callback as the events of `aigc.train.events`.
"""
