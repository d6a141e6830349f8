"""The cross-backend consistency matrix of the block: one run of the workers
per test session, one test per (case, check, backend) cell and per backend pair.

Run once, with any KERAS_BACKEND (the parent process runs no framework; `make
test` uses numpy): the workers are subprocesses, one per backend. The run is
shared with `test_export_cases` (`built_in_run`: some of these cases are
exported there too); this module judges every cell but the export ones.
"""

import dataclasses
import functools
import itertools

import numpy as np
import pytest

from mhsa_core import reference
from mhsa_core.consistency import budgets, cases, checks, matrix, oracles, protocol
from mhsa_core.consistency.protocol import TRAINING_BACKENDS, case_backends
from mhsa_core.consistency.report import Cell
from mhsa_core.reference import schema

import built_in_run

BACKENDS = built_in_run.BACKENDS
CASES = built_in_run.CASES
CASES_BY_NAME = {c.name: c for c in CASES}

CELLS = [
    (c.name, check, b) for c in CASES for check, b in matrix.expected_cells(c, BACKENDS)
]
# Pairwise agreement against the float budgets: the float cases. A quantized
# case's backends may differ by an int8 rounding flip: its pairs are judged by
# the matrix's own cells, with the quantized rule (`test_cell_within_budget`;
# test_quantized.py).
FLOAT_CASES = [c for c in CASES if c.quantization is None]
FORWARD_PAIRS = [
    (c.name, a, b)
    for c in FLOAT_CASES
    for a, b in itertools.combinations(case_backends(c.dtype, BACKENDS), 2)
]
TRAINING_PAIRS = [
    (c.name, a, b)
    for c in FLOAT_CASES
    for a, b in itertools.combinations(TRAINING_BACKENDS, 2)
]


def _ids(triples):
    return [f"{case}-{a}-vs-{b}" for case, a, b in triples]


@pytest.fixture
def report(built_in_report):
    return built_in_report


def test_every_worker_ran(report):
    assert report.worker_errors == {}
    errors = [r for r in report.rows if r.check == checks.ERRORS]
    assert not errors, "\n".join(
        f"{r.case} {b}: {c.note}" for r in errors for b, c in r.cells.items()
    )


@pytest.mark.parametrize(
    "case,check,backend",
    CELLS,
    ids=[f"{c}-{chk}-{b}".replace(" ", "_") for c, chk, b in CELLS],
)
def test_cell_within_budget(report, case, check, backend):
    cell = report.cell(case, check, backend)
    assert cell is not None, f"no result for {case}/{check} on {backend}"
    assert cell.passed, (
        f"{case}/{check} on {backend}: error {cell.error:.3g} > budget "
        f"{cell.budget:.3g} (ratio {cell.ratio:.2f}) {cell.note}"
    )


# The cells of the shared run's exports (`built_in_run.EXPORT_FORMATS`),
# judged in `test_export_cases`.
EXPORT_CELLS = {
    (c.name, check, b)
    for c in built_in_run.RUN_CASES
    for check, b in matrix.expected_cells(c, BACKENDS)
    if check.endswith(" export")
}


def test_report_has_exactly_the_expected_cells(report):
    """Nothing missing, nothing extra: the report's cells are the derived list
    (and the export cells of the cases the shared run exports)."""
    got = {
        (r.case, r.check, b)
        for r in report.rows
        if r.check != checks.ERRORS
        for b in r.cells
    }
    assert EXPORT_CELLS and not EXPORT_CELLS & set(CELLS)
    assert got == set(CELLS) | EXPORT_CELLS


@pytest.mark.parametrize(
    "check", matrix.all_checks(), ids=[c.name for c in matrix.all_checks()]
)
def test_every_check_yields_exactly_its_expected_cells(report, check):
    for case in built_in_run.RUN_CASES:
        ctx = checks.CaseContext(case, report.runs, BACKENDS)
        got = {(row.check, b) for row in check.rows(ctx) for b in row.cells}
        assert got == set(check.expected_cells(case, BACKENDS)), case.name


def test_a_new_check_is_one_object(report, monkeypatch):
    """Appending a Check to CHECKS is all it takes: the tasks, expected cells,
    rows and JSON follow."""

    def finite(ctx, saver):
        return {
            b: Cell(passed=bool(np.all(np.isfinite(res[protocol.out_key(0)]))))
            for b, res in ctx.results(protocol.FORWARD).items()
        }

    new = checks.Check("forward finite", (protocol.FORWARD,), finite, kinds=("layer",))
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, new])
    case = CASES_BY_NAME["masked"]
    assert [c for c in matrix.expected_cells(case, BACKENDS) if c[0] == new.name] == [
        (new.name, b) for b in BACKENDS
    ]
    evaluated = matrix.evaluate([case], report.runs, BACKENDS)
    assert evaluated.rows[-1].check == new.name
    assert all(evaluated.cell("masked", new.name, b).passed for b in BACKENDS)
    json_rows = [r for r in evaluated.to_json()["rows"] if r["check"] == new.name]
    assert len(json_rows) == 1 and set(json_rows[0]["cells"]) == set(BACKENDS)


@functools.cache
def _forward_budgets(case_name):
    """The float64 reference and float32 budgets of a case's forward outputs
    (computed once per case, not once per backend pair)."""
    return oracles.reference_oracles(CASES_BY_NAME[case_name])["out"]


@pytest.mark.parametrize("case,a,b", FORWARD_PAIRS, ids=_ids(FORWARD_PAIRS))
def test_forward_agrees(report, case, a, b):
    """Pairwise: |out_a - out_b| <= budget_a + budget_b (both within budget of
    the float64 reference implies it; checked directly here)."""
    oracle, limits = _forward_budgets(case)
    out_a = report.runs[a].results[case][protocol.FORWARD]
    out_b = report.runs[b].results[case][protocol.FORWARD]
    for key in oracle:
        diff = reference.max_abs(out_a[key].astype(np.float64), out_b[key])
        assert diff <= 2 * limits[key], f"{key}: |{a} - {b}| = {diff:.3g}"


@pytest.mark.parametrize("case,a,b", TRAINING_PAIRS, ids=_ids(TRAINING_PAIRS))
def test_gradients_agree(report, case, a, b):
    grads = {k: report.runs[k].results[case][protocol.GRADS] for k in TRAINING_BACKENDS}
    grads64 = {
        k: report.runs[k].results[case][protocol.GRADS64] for k in TRAINING_BACKENDS
    }
    keys = protocol.keys_with({a: grads64[a]}, protocol.GRADIENT_PREFIXES)
    assert keys and keys == protocol.keys_with(
        {b: grads[b]}, protocol.GRADIENT_PREFIXES
    )
    # Every input variant was differentiated (`input_grad_key(v, k)`,
    # `weight_grad_key(v, j)`).
    variants = len(CASES_BY_NAME[case].variants)
    assert {protocol.variant_of(k) for k in keys} == set(range(variants))
    oracle = oracles.float64_oracle(grads64, keys)
    limits = budgets.variant_budgets(grads, grads64, oracle, keys)
    for key in keys:
        diff = reference.max_abs(grads[a][key].astype(np.float64), grads[b][key])
        assert diff <= 2 * limits[key], f"{key}: |{a} - {b}| = {diff:.3g}"
        # float64: the backends agree to FLOAT64_RTOL of the variant's largest gradient.
        v = protocol.variant_of(key)
        scale = max(
            np.max(np.abs(oracle[k])) for k in keys if protocol.variant_of(k) == v
        )
        diff64 = reference.max_abs(grads64[a][key], grads64[b][key])
        assert diff64 <= 2 * reference.FLOAT64_RTOL * scale, (
            f"{key} float64: {diff64:.3g}"
        )


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
            identical = [
                result[k] for k in result if k.startswith(protocol.IDENTICAL_PREFIX)
            ]
            assert identical and all(bool(x) for x in identical), (saver, loader)
            loads += 1
    assert loads == len(TRAINING_BACKENDS) * (len(loaders) - 1)


def test_dynamic_case_ran_two_sizes(report):
    result = report.runs["torch"].loads[("jax", "dynamic")]
    assert result[protocol.out_key(0)].shape == (2, 5, 7, 16)
    assert result[protocol.out_key(1)].shape == (1, 9, 4, 16)
    for backend in TRAINING_BACKENDS:  # gradients at both sizes too
        grads = report.runs[backend].results["dynamic"][protocol.GRADS]
        assert grads[protocol.input_grad_key(0, 0)].shape == (2, 5, 7, 16)
        assert grads[protocol.input_grad_key(1, 0)].shape == (1, 9, 4, 16)


def test_float64_case_is_float64(report):
    for backend in TRAINING_BACKENDS:
        out = report.runs[backend].results["float64"][protocol.FORWARD][
            protocol.out_key(0)
        ]
        assert out.dtype == np.float64, backend


# ------------------------------------------------------- position encodings
LEARNED = {
    name: schema.table_names(name)
    for name, spec in schema.ENCODINGS.items()
    if spec.learned_tables
}
POSITION_CASES = [c for c in CASES if c.config["position_encoding"] in LEARNED]


def _spatial(case, shape):
    """(H, W) of an input or output shape of `case`."""
    if case.config.get("data_format") == "channels_first":
        return tuple(shape[2:4])
    return tuple(shape[1:3])


def test_every_position_encoding_is_covered():
    encodings = {c.config["position_encoding"] for c in CASES}
    assert encodings == set(schema.POSITION_ENCODINGS)
    assert any(c.config.get("scale_position_logits") is False for c in POSITION_CASES)
    assert any(c.config.get("data_format") == "channels_first" for c in POSITION_CASES)
    assert any(len(set(c.config["position_size"])) == 2 for c in POSITION_CASES)
    # The default cases (`mhsa-core matrix`, `make demo`) show one of them.
    assert any(c.config["position_encoding"] in LEARNED for c in cases.default_cases())


@pytest.mark.parametrize("case", [c.name for c in POSITION_CASES])
def test_learned_position_case_ran_reference_and_other_size(report, case):
    """Forward, jit, scores, gradients, optimizer steps and every `.keras` load
    ran at the tables' reference size and at another (resized) size."""
    c = CASES_BY_NAME[case]
    sizes = [_spatial(c, v["x"].shape) for v in c.variants]
    reference_size = tuple(c.config["position_size"])
    assert reference_size in sizes and any(s != reference_size for s in sizes), sizes
    for backend in case_backends(c.dtype, BACKENDS):
        run = report.runs[backend]
        tasks = [protocol.FORWARD, protocol.SCORES]
        if backend in TRAINING_BACKENDS:
            tasks += [protocol.FORWARD64, protocol.JIT]
            for task in (protocol.GRADS, protocol.GRADS64):
                grads = run.results[case][task]
                got = [
                    _spatial(c, grads[protocol.input_grad_key(v, 0)].shape)
                    for v in range(len(sizes))
                ]
                assert got == sizes, (backend, task, got)
            optim = run.results[case][protocol.OPTIMIZERS]
            for v in range(len(sizes)):
                for optimizer in protocol.OPTIMIZER_SETTINGS:
                    assert protocol.step_key(optimizer, v, 0) in optim, (
                        backend,
                        optimizer,
                        v,
                    )
        for task in tasks:
            out = run.results[case][task]
            got = [
                _spatial(c, out[protocol.out_key(v)].shape)
                if task != protocol.SCORES
                else out[protocol.out_key(v)].shape[-1]
                for v in range(len(sizes))
            ]
            want = sizes if task != protocol.SCORES else [h * w for h, w in sizes]
            assert got == want, (backend, task, got)
        for saver in TRAINING_BACKENDS:
            if saver != backend:
                load = run.loads[(saver, case)]
                got = [
                    _spatial(c, load[protocol.out_key(v)].shape)
                    for v in range(len(sizes))
                ]
                assert got == sizes, (saver, backend, got)


def _table_indices(case, result):
    """{table name: j} of the position tables among `start_key(j)`, found by
    value (the worker's weights are exactly the case's float32-representable
    ones)."""
    tables = LEARNED[case.config["position_encoding"]]
    n = protocol.count_keys(result, protocol.START_PREFIX)
    starts = {j: result[protocol.start_key(j)] for j in range(n)}
    found = {}
    for name in tables:
        want = case.weights[name]
        matches = [
            j
            for j, w in starts.items()
            if w.shape == want.shape and np.array_equal(w.astype(np.float64), want)
        ]
        assert len(matches) == 1, (
            name,
            want.shape,
            {j: w.shape for j, w in starts.items()},
        )
        found[name] = matches[0]
    return found


@pytest.mark.parametrize("case", [c.name for c in POSITION_CASES])
def test_position_tables_gradients_are_compared(report, case):
    """The tables are trainable weights whose gradients, at every size, are
    among the arrays the gradients row judges, nonzero (the tables are used),
    and within that row's budget of the float64 oracle on every backend."""
    c = CASES_BY_NAME[case]
    grads = {b: report.runs[b].results[case][protocol.GRADS] for b in TRAINING_BACKENDS}
    grads64 = {
        b: report.runs[b].results[case][protocol.GRADS64] for b in TRAINING_BACKENDS
    }
    keys = protocol.keys_with(grads64, protocol.GRADIENT_PREFIXES)
    oracle = oracles.float64_oracle(grads64, keys)
    limits = budgets.variant_budgets(grads, grads64, oracle, keys)
    for backend in TRAINING_BACKENDS:
        optim = report.runs[backend].results[case][protocol.OPTIMIZERS]
        tables = _table_indices(c, grads[backend])
        assert tables == _table_indices(c, optim)
        for name, j in tables.items():
            for v in range(len(c.variants)):
                key = protocol.weight_grad_key(v, j)
                assert key in keys, key
                assert grads[backend][key].shape == c.weights[name].shape
                assert np.max(np.abs(oracle[key])) > 0, (name, v)
                error = reference.max_abs(
                    grads[backend][key].astype(np.float64), oracle[key]
                )
                assert error <= limits[key], (backend, name, v, error, limits[key])
                # The optimizer steps moved the tables too.
                for optimizer in protocol.OPTIMIZER_SETTINGS:
                    assert not np.array_equal(
                        optim[protocol.step_key(optimizer, v, j)],
                        optim[protocol.start_key(j)],
                    ), optimizer


@pytest.mark.parametrize(
    "case,saver", [(c.name, s) for c in POSITION_CASES for s in TRAINING_BACKENDS]
)
def test_position_keras_file_runs_at_a_new_size_elsewhere(report, case, saver):
    """A `.keras` file with learned tables, saved under `saver`, loads under
    every other backend (numpy too) with the exact tables, and runs there at a
    size it was not built for within the reference's budget."""
    c = CASES_BY_NAME[case]
    reference_size = tuple(c.config["position_size"])
    oracle, limits = _forward_budgets(case)
    for loader in case_backends(c.dtype, BACKENDS):
        if loader == saver:
            continue
        load = report.runs[loader].loads[(saver, case)]
        assert all(
            bool(load[k]) for k in load if k.startswith(protocol.IDENTICAL_PREFIX)
        )
        resized = [
            v
            for v, variant in enumerate(c.variants)
            if _spatial(c, variant["x"].shape) != reference_size
        ]
        assert resized
        for v in resized:
            key = protocol.out_key(v)
            error = reference.max_abs(load[key].astype(np.float64), oracle[key])
            assert error <= limits[key], (loader, key, error, limits[key])


def test_scale_position_logits_reaches_every_backend(report):
    """The case with scale_position_logits=False: its oracle honours the flag,
    and every backend's output is far (beyond the float32 budget) from what the
    flag's other value gives, so a layer or an oracle ignoring it would fail."""
    case = next(
        c for c in POSITION_CASES if c.config.get("scale_position_logits") is False
    )
    assert case.config["scale"] != 1.0  # else the flag changes nothing
    oracle, limits = _forward_budgets(case.name)
    ref_config = {
        **reference.reference_config(case.config),
        "scale_position_logits": True,
    }
    for v, variant in enumerate(case.variants):
        other = reference.mhsa_forward(
            variant["x"],
            case.weights,
            attention_mask=variant.get("attention_mask"),
            **ref_config,
        )
        key = protocol.out_key(v)
        assert reference.max_abs(other, oracle[key]) > 100 * limits[key]
        for backend in case_backends(case.dtype, BACKENDS):
            out = report.runs[backend].results[case.name][protocol.FORWARD][key]
            assert reference.max_abs(out, other) > 10 * limits[key], (backend, key)


@pytest.mark.slow
def test_table_gradient_bug_at_the_resized_size_only_is_caught():
    """A JAX-only bug in the gradients of the resized tables (planted by
    `resize_grad_bug`): invisible in the forward pass and at the reference
    size (variant 0 of "absolute"); the gradients row fails on JAX, on the
    resized variant's keys, and only there."""
    case = dataclasses.replace(
        CASES_BY_NAME["absolute"],
        tasks=(protocol.FORWARD, protocol.GRADS, protocol.GRADS64),
    )
    reference_size = tuple(case.config["position_size"])
    assert _spatial(case, case.variants[0]["x"].shape) == reference_size
    assert _spatial(case, case.variants[1]["x"].shape) != reference_size
    report = matrix.run_matrix(
        [case], ["tensorflow", "jax"], imports=["resize_grad_bug"]
    )
    assert report.worker_errors == {}
    for backend in ("tensorflow", "jax"):
        assert report.cell("absolute", "forward", backend).passed
    assert report.cell("absolute", "gradients", "tensorflow").passed
    for check in ("gradients", "gradients float64"):
        cell = report.cell("absolute", check, "jax")
        assert cell.passed is False and cell.note.startswith("weight/1/"), (check, cell)
    # Variant 0 (the reference size) alone is right on JAX: the bug would go
    # unseen by gradients taken at that size only.
    grads = {
        b: report.runs[b].results["absolute"][protocol.GRADS]
        for b in ("tensorflow", "jax")
    }
    grads64 = {
        b: report.runs[b].results["absolute"][protocol.GRADS64]
        for b in ("tensorflow", "jax")
    }
    keys = [
        k
        for k in protocol.keys_with(grads64, protocol.GRADIENT_PREFIXES)
        if protocol.variant_of(k) == 0
    ]
    oracle = oracles.float64_oracle(grads64, keys)
    limits = budgets.variant_budgets(grads, grads64, oracle, keys)
    assert checks.judge(grads["jax"], oracle, keys, limits).passed
