"""Test helpers for users' own models: `assert_backends_agree`, `within_budget`.

    from mhsa_core.testing import assert_backends_agree

    def test_my_model_is_portable():
        assert_backends_agree(build_my_model(), inputs=my_batch)

    from mhsa_core.testing import assert_within_budget

    def test_exported_model_is_the_same(model, x):
        assert_within_budget(run_exported_artifact(x), model, x)

`assert_within_budget` / `within_budget` judge one result with the budget the
matrix would give it (instead of a hand-picked atol). The implementations
live in `mhsa_core.consistency.testing` and `mhsa_core.consistency.budget_check`.
"""

from mhsa_core.consistency.budget_check import BudgetVerdict as BudgetVerdict
from mhsa_core.consistency.budget_check import (
    assert_within_budget as assert_within_budget,
)
from mhsa_core.consistency.budget_check import within_budget as within_budget
from mhsa_core.consistency.testing import assert_backends_agree as assert_backends_agree

__all__ = [
    "assert_backends_agree",
    "within_budget",
    "assert_within_budget",
    "BudgetVerdict",
]
