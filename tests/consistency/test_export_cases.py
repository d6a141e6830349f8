"""Export parity of the layer's options and encodings of issues 19 and 20.

The matrix run of the built-in cases (`consistency.cases.extended_cases`)
that `test_matrix` judges too (`built_in_run`, a session fixture: exports
take seconds each), with these cases also exported:
- "swin" (3x3 windows shifted by 1 with Swin's bias, at 7x5: padded and
  masked; and at 3x3: one window, no shift), in every format from every
  backend, and "rope" (a reference grid, at it and at another size and
  batch) in SavedModel, ONNX and LiteRT;
- "rope_mixed" (learned frequencies, masked) and "qknorm_proj" (q/k
  LayerNorms and the output projection, masked) in SavedModel and ONNX;
- issue 20's "eva_cls" (two inputs, two outputs) in SavedModel, ONNX and
  LiteRT, "cross" (a context map and its mask) in SavedModel and ONNX,
  "pvt_v2" (reduced keys) in ONNX.

Each cell is judged like the backends' forward cells (the float64 oracle
and its budgets); a format that keeps sizes dynamic runs both sizes through
one artifact. What is expected of each (format, backend) is
`test_export.EXPECTED`, the measured table (this install).
"""

import importlib.util

import pytest
from test_export import EXPECTED, needs_export

from mhsa_core.consistency import cases
from mhsa_core.consistency.features import export

import built_in_run

# The run is the one `test_matrix` judges (`built_in_run`: every task of
# every case, these cases also exported); this module judges its exports.
FORMATS = built_in_run.EXPORT_FORMATS
# Who exports with the model's own signature (None sizes stay dynamic): one
# artifact runs every size.
DYNAMIC = {
    case: [
        (f, b)
        for f, b, expected in EXPECTED
        if f in formats and expected == "pass" and (f, b) not in export.STATIC_EXPORTS
    ]
    for case, formats in FORMATS.items()
}
RUNS_BOTH_SIZES = [(c, f, b) for c in ("rope", "swin") for f, b in DYNAMIC[c]]


@pytest.fixture
def report(built_in_report):
    return built_in_report


CELLS = [
    (name, fmt, backend, expected)
    for name, formats in FORMATS.items()
    for fmt, backend, expected in EXPECTED
    if fmt in formats
]


@needs_export
@pytest.mark.parametrize(
    "case, fmt, backend, expected",
    CELLS,
    ids=[f"{c}-{f}-from-{b}" for c, f, b, _ in CELLS],
)
def test_export_cell_of_the_new_cases(report, case, fmt, backend, expected):
    needs = expected.removeprefix("skipped: needs ")
    if needs != expected and importlib.util.find_spec(needs) is not None:
        pytest.skip(f"{needs} is installed here: this cell is not skipped")
    cell = report.cell(case, f"{fmt} export", backend)
    if expected == "pass":
        assert cell.passed is True, cell
        assert cell.ratio <= 1.0 and cell.budget > 0
    else:
        assert cell.passed is None and cell.note.startswith(expected), cell


@needs_export
@pytest.mark.parametrize(
    "case, fmt, backend",
    RUNS_BOTH_SIZES,
    ids=[f"{c}-{f}-from-{b}" for c, f, b in RUNS_BOTH_SIZES],
)
def test_one_dynamic_artifact_runs_both_sizes(report, case, fmt, backend):
    """Where the exporter keeps H and W dynamic, one artifact ran both
    variants ("swin": the padded, shifted 7x5 map and the single 3x3 window;
    "rope": its reference grid and another size and batch) and the cell
    says no narrower scope."""
    variants = {c.name: c for c in cases.extended_cases()}[case].variants
    res = report.runs[backend].results[case][export.EXPORT]
    assert str(res[export.export_status_key(fmt)]) == export.EXPORT_OK
    assert [res[export.export_key(fmt, v)].shape for v in range(len(variants))] == [
        v["x"].shape for v in variants
    ]
    assert "static export" not in report.cell(case, f"{fmt} export", backend).scope
