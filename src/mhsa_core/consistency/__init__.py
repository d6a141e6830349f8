"""The cross-backend consistency tool: `mhsa-core matrix`, `assert_backends_agree`.

One module per concept:

- `protocol`: backends, worker tasks, files and result keys, optimizer settings;
- `cases`: what runs (cases of our layer, of users' `.keras` files);
- `runner` / `worker`: one worker process per backend (only the worker imports
  Keras); `task_context`: what every worker task works on; `tasks`: the
  matrix's own tasks;
- `gradients`: loss gradients and optimizer steps on the worker's backend;
- `oracles` / `budgets`: what a result is compared with, and how far off it may be;
- `checks`: the checks, each declared once in `checks.CHECKS`;
- `features`: the opt-in features (`--export`, `--locate`, `--steps`), one
  object each in `features.FEATURES`: options, worker tasks, checks, text;
- `matrix`: run the cases, judge every check;
- `report`: cells, rows, the report, its table, JSON and verdict;
- `cli`: the `matrix` and `demo` commands of `mhsa-core`; `testing`:
  `assert_backends_agree`.

Importing this package imports nothing (no framework).
"""
