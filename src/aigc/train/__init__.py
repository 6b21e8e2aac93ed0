"""Training: the loop, optimiser and schedule, and `checkpoint`, the only save/load of a run.

Entry point: `aigc.train.loop.train(data_dir, out_dir, ...)`; progress arrives through the
`on_event` callback as the events of `aigc.train.events`.
"""
