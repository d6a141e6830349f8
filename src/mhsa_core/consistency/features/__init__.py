"""The opt-in features of the matrix: one object each (`base.Feature`), in one
table (`FEATURES`).

- `export`: `--export FORMATS`, the model exported from each backend and run
  in each format's own runtime, judged like the backends;
- `locate`: `--locate`, every layer call's output, and the first layer that
  leaves its budget;
- `drift`: `--steps K`, K optimizer steps in float32 and float64, and how
  far each backend drifts from the float64 run.

Adding a feature is its module (a `Feature` with its options, tasks, checks
and text) and one entry in `FEATURES`. The command line's arguments, the
keywords of `run_matrix` / `assert_backends_agree`, the worker's tasks, the
report's rows, sections and text all read this table, in its order.
"""

from mhsa_core.consistency import protocol
from mhsa_core.consistency.features import drift, export, locate
from mhsa_core.consistency.features.base import Feature

__all__ = [
    "Feature",
    "FEATURES",
    "tasks",
    "known_tasks",
    "inference_tasks",
    "options",
    "keywords",
]

# In this order: their arguments in `mhsa-core matrix --help`, their checks'
# rows (after the matrix's own), their text after the report's table and
# after its errors, their sections of the JSON.
FEATURES = (export.FEATURE, locate.FEATURE, drift.FEATURE)

# What follows reads FEATURES when called, never a copy of it.


def tasks():
    """{task name: the feature whose task it is}: the worker runs
    `feature.tasks[task]` with the case's options of that feature."""
    return {task: f for f in FEATURES for task in f.tasks}


def known_tasks():
    """Every task a case may have: the matrix's own, then the features', in
    the order a worker runs them."""
    return protocol.ALL_TASKS + tuple(tasks())


def inference_tasks():
    """The tasks that a backend without training (numpy) runs."""
    return protocol.INFERENCE_TASKS + tuple(
        t for f in FEATURES for t in f.inference_tasks
    )


def options(*, rtol=None, **keywords):
    """{feature name: its `Options`} from the keywords of `run_matrix` /
    `assert_backends_agree` (a feature without keywords: off), each checked
    by its feature against the run's `rtol`.

    Raises:
        TypeError: a keyword of no feature.
        ValueError: a bad value (the feature's message names the argument).
    """
    known = {k for f in FEATURES for k in f.keywords}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(
            f"Unknown keyword argument(s) {unknown}: the opt-in features take "
            f"{sorted(known)}. Received: {', '.join(unknown)}"
        )
    return {
        f.name: f.options(
            rtol=rtol, **{k: v for k, v in keywords.items() if k in f.keywords}
        )
        for f in FEATURES
    }


def keywords(options):
    """The keywords of `run_matrix` that give `options` ({feature name:
    `Options`}) back: every feature's fields, in one dict."""
    out = {}
    for f in FEATURES:
        if f.name in options:
            out.update({k: getattr(options[f.name], k) for k in f.keywords})
    return out
