"""The bottom layer: the files every stage passes around, as typed objects.

`run.py` owns the run folder (`RunConfig`, `Weights`, `Run`, `load_run`), `state.py` its training
state, `dataset.py` the prepared dataset folder (`Dataset`, `open_dataset`, the shards),
`registry.py` the weight loaders that the layers above plug in, and `device.py` device choice.
It imports nothing from the stages above it (`tests/test_layers.py` keeps it so).
"""
