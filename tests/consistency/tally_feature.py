"""An opt-in feature made for `test_features.py`: "tally" counts the model's
weights on every backend, and a check says whether the backends agree.

It is what a new feature is: this one module (its options, worker task,
check, section and text) and one entry in `features.FEATURES`. Importing the
module adds that entry, as a plugin would; the workers import it through
`imports=["tally_feature"]`, the test adds it to the parent's table itself.
"""

import dataclasses

import numpy as np

from mhsa_core.consistency import features
from mhsa_core.consistency.checks import Check
from mhsa_core.consistency.features.base import Feature
from mhsa_core.consistency.report import Cell

NAME = TASK = "tally"
CHECK_NAME = "weights tallied"
WEIGHTS_KEY = "weights"  # the model's number of weights
TIMES_KEY = "times"  # the option, as the worker got it


def tally(ctx, options, timings):
    """Task "tally": the model's weight count, after calling it once."""
    ctx.forward(ctx.model, ctx.variants[0])
    return {
        WEIGHTS_KEY: np.asarray(ctx.model.count_params()),
        TIMES_KEY: np.asarray(options.times),
    }


def _judge(ctx, item):
    results = ctx.results(TASK)
    counts = {b: int(r[WEIGHTS_KEY]) for b, r in results.items()}
    agree = len(set(counts.values())) == 1
    return {
        b: Cell(passed=agree, note=f"{counts[b]} weights, times={int(r[TIMES_KEY])}")
        for b, r in results.items()
    }


@dataclasses.dataclass(frozen=True)
class TallyOptions:
    times: int = 0


class _Tally(Feature):
    name = NAME
    Options = TallyOptions
    tasks = {TASK: tally}
    inference_tasks = (TASK,)
    checks = (Check(CHECK_NAME, (TASK,), _judge),)
    examples = ("mhsa-core matrix --model my_model.keras --times 3",)

    def options(self, *, rtol=None, times=0):
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ValueError(
                f"`times` must be a non-negative integer. Received: times={times!r}"
            )
        return TallyOptions(times)

    def add_arguments(self, parser):
        parser.add_argument(
            "--times", type=int, default=0, help="tally the weights (a test feature)"
        )

    def options_from_args(self, args):
        if args.times < 0:
            raise ValueError(f"--times expects >= 0; received: {args.times}")
        return TallyOptions(args.times)

    def section(self, report, cases, rtol=None):
        return [
            {
                "case": case.name,
                "weights": {
                    b: int(run.results[case.name][TASK][WEIGHTS_KEY])
                    for b, run in report.runs.items()
                    if TASK in run.results.get(case.name, {})
                },
            }
            for case in cases
            if TASK in case.tasks
        ] or None

    def tables(self, report, options):
        return [f"tally table: times={options.times}"] if self.enabled(options) else []

    def notes(self, report, options):
        return [f"tally note: {len(report.sections.get(NAME, []))} case(s)"]


FEATURE = _Tally()

if FEATURE not in features.FEATURES:  # the one entry in the table
    features.FEATURES = (*features.FEATURES, FEATURE)
