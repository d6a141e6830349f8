"""The cross-backend consistency matrix of the block: one run of the workers
per test session, one test per (case, check, backend) cell and per backend pair.

Run once, with any KERAS_BACKEND (the parent process runs no framework; `make
test` uses numpy): the workers are subprocesses, one per backend.
"""

import itertools

import numpy as np
import pytest

from mhsa_core import matrix
from mhsa_core.runner import TRAINING_BACKENDS, case_backends

BACKENDS = ["tensorflow", "torch", "jax", "numpy"]
CASES = matrix.extended_cases()
CASES_BY_NAME = {c.name: c for c in CASES}

CELLS = [(c.name, check, b) for c in CASES for check, b in matrix.expected_cells(c, BACKENDS)]
FORWARD_PAIRS = [(c.name, a, b) for c in CASES
                 for a, b in itertools.combinations(case_backends(c.dtype, BACKENDS), 2)]
TRAINING_PAIRS = [(c.name, a, b) for c in CASES
                  for a, b in itertools.combinations(TRAINING_BACKENDS, 2)]


def _ids(triples):
    return [f"{case}-{a}-vs-{b}" for case, a, b in triples]


@pytest.fixture(scope="session")
def report():
    return matrix.run_matrix(CASES, BACKENDS)


def test_every_worker_ran(report):
    assert report.worker_errors == {}
    errors = [r for r in report.rows if r.check == "errors"]
    assert not errors, "\n".join(f"{r.case} {b}: {c.note}" for r in errors
                                 for b, c in r.cells.items())


@pytest.mark.parametrize("case,check,backend", CELLS,
                         ids=[f"{c}-{chk}-{b}".replace(" ", "_") for c, chk, b in CELLS])
def test_cell_within_budget(report, case, check, backend):
    cell = report.cell(case, check, backend)
    assert cell is not None, f"no result for {case}/{check} on {backend}"
    assert cell.passed, (
        f"{case}/{check} on {backend}: error {cell.error:.3g} > budget {cell.budget:.3g} "
        f"(ratio {cell.ratio:.2f}) {cell.note}"
    )


def _forward_budgets(case):
    oracle, budgets = matrix._reference_oracles(case)["out"]
    return oracle, budgets


@pytest.mark.parametrize("case,a,b", FORWARD_PAIRS, ids=_ids(FORWARD_PAIRS))
def test_forward_agrees(report, case, a, b):
    """Pairwise: |out_a - out_b| <= budget_a + budget_b (both within budget of
    the float64 reference implies it; checked directly here)."""
    oracle, budgets = _forward_budgets(CASES_BY_NAME[case])
    out_a = report.runs[a].results[case]["forward"]
    out_b = report.runs[b].results[case]["forward"]
    for key in oracle:
        diff = np.max(np.abs(out_a[key].astype(np.float64) - out_b[key]))
        assert diff <= 2 * budgets[key], f"{key}: |{a} - {b}| = {diff:.3g}"


@pytest.mark.parametrize("case,a,b", TRAINING_PAIRS, ids=_ids(TRAINING_PAIRS))
def test_gradients_agree(report, case, a, b):
    grads = {k: report.runs[k].results[case]["grads"] for k in TRAINING_BACKENDS}
    grads64 = {k: report.runs[k].results[case]["grads64"] for k in TRAINING_BACKENDS}
    keys = [k for k in grads64[a] if k.startswith(("input/", "weight/"))]
    assert keys and set(keys) == {k for k in grads[b] if k.startswith(("input/", "weight/"))}
    oracle = matrix._float64_oracle(grads64, keys)
    budgets = matrix._peer_budgets(grads, grads64, oracle, keys)
    for key in keys:
        diff = np.max(np.abs(grads[a][key].astype(np.float64) - grads[b][key]))
        assert diff <= 2 * budgets[key], f"{key}: |{a} - {b}| = {diff:.3g}"
        # float64: the backends agree to FLOAT64_RTOL of the largest gradient.
        scale = max(np.max(np.abs(oracle[k])) for k in keys)
        diff64 = np.max(np.abs(grads64[a][key] - grads64[b][key]))
        assert diff64 <= 2 * 1e-10 * scale, f"{key} float64: {diff64:.3g}"


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_keras_files_load_bit_identical(report, case):
    """Every file saved under one backend loads under every other with the
    exact weights the saver had."""
    loads = 0
    loaders = case_backends(CASES_BY_NAME[case].dtype, BACKENDS)
    for loader in loaders:
        for saver in TRAINING_BACKENDS:
            if saver == loader:
                continue
            result = report.runs[loader].loads[(saver, case)]
            identical = [result[k] for k in result if k.startswith("identical/")]
            assert identical and all(bool(x) for x in identical), (saver, loader)
            loads += 1
    assert loads == len(TRAINING_BACKENDS) * (len(loaders) - 1)


def test_dynamic_case_ran_two_sizes(report):
    result = report.runs["torch"].loads[("jax", "dynamic")]
    assert result["out/0"].shape == (2, 5, 7, 16)
    assert result["out/1"].shape == (1, 9, 4, 16)


def test_float64_case_is_float64(report):
    for backend in TRAINING_BACKENDS:
        out = report.runs[backend].results["float64"]["forward"]["out/0"]
        assert out.dtype == np.float64, backend
