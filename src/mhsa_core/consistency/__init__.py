"""The cross-backend consistency tool: `mhsa-core matrix`, `assert_backends_agree`.

One module per concept:

- `protocol`: backends, worker tasks, files and result keys, optimizer settings;
- `cases`: what runs (cases of our layer, of users' `.keras` files);
- `runner` / `worker`: one worker process per backend (only the worker imports Keras);
- `gradients`: loss gradients and optimizer steps on the worker's backend;
- `oracles` / `budgets`: what a result is compared with, and how far off it may be;
- `checks`: the checks, each declared once in `checks.CHECKS`;
- `matrix`: run the cases, judge every check;
- `report`: cells, rows, the report, its table, JSON and verdict;
- `cli`: the `mhsa-core` command; `testing`: `assert_backends_agree`.

Importing this package imports nothing (no framework).
"""
