"""`mhsa-core bench`: the layer's speed and memory on each backend, next to
each backend's native fused attention and Keras's MultiHeadAttention.

One concept per module:

- `configs`: the shapes measured (a table of `BenchConfig`);
- `flops`: the FLOP count behind GF/s (the formula in its docstring);
- `plan`: the rows of a run (backend, config, path, mode, direction);
- `run`: the parent: a fresh worker per row, a watchdog on its memory and time;
- `worker`: one row in its own process (`python -m mhsa_core.bench.worker`);
- `engines`: how each backend compiles, differentiates, synchronises, and its
  matmul ceiling; `subjects`: the layer / native (`fused_block` of
  `mhsa_core.natives`) / Keras MHA being measured; `memory`: peak RSS growth;
- `report`: the JSON, the tables, the plot; `command`: the CLI's arguments.

The parent (everything but `worker`, `engines`, `subjects`)
imports no framework.
"""
