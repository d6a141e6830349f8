"""`matrix --export`: the model exported from each backend, run in each
format's own runtime, judged by the same float64 oracle as the backends.

One matrix run (module-scoped: exports take seconds each) of two cases:
- "two": our layer with two position encodings (relative, sinusoidal) in one
  model, two input sizes through one model, every format from every backend;
- "masked": the built-in masked layer case (a bool mask input), as LiteRT
  (the mask's broadcast once needed a Flex op the interpreter lacks);
- "shapebug": a model whose exported graph differs from the model (a layer
  that scales when its height is unknown, as in an export traced with dynamic
  sizes), exported as LiteRT from TensorFlow: its cell must fail;
- "paths": our layer on the chunked path, then on the fused path, every
  format from every backend: where a format cannot take the chunked path's
  loop (`export.path_fallbacks()`), it is exported on the full path and the
  cell says so; everywhere else the artifact keeps the layer's paths.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D
from mhsa_core.consistency import cases, matrix, protocol
from mhsa_core.consistency.features import export
from mhsa_core.consistency.report import cell_text
from mhsa_core.layers.attention import choice
from mhsa_core.reference import schema

import custom_layers

THREE = ["tensorflow", "torch", "jax"]
RUNTIMES = ("onnxruntime", "openvino", "ai_edge_litert", "tensorflow", "torch", "jax")
MISSING = [m for m in RUNTIMES if importlib.util.find_spec(m) is None]
needs_export = pytest.mark.skipif(
    bool(MISSING),
    reason=f"export runtimes/backends not installed: {', '.join(MISSING)} "
    "(pip install mhsa-core[export])",
)

SIZES = [(2, 5, 5, 8), (2, 7, 4, 8)]  # the tables' reference size, and another


def _variants(seed):
    rng = np.random.default_rng(seed)
    return [{"input_0": rng.standard_normal(s).astype("float32")} for s in SIZES]


def _two_encodings(path):
    inputs = keras.Input((None, None, 8))
    x = MultiHeadSelfAttention2D(
        num_heads=2, position_encoding="relative", position_size=(5, 5)
    )(inputs)
    x = MultiHeadSelfAttention2D(num_heads=2, position_encoding="sinusoidal")(x)
    keras.Model(inputs, x).save(path)


def _paths(path):
    # Relative rows per chunk, chunks of 16: a ragged last chunk at both sizes
    # (25 tokens = 16 + 9, 28 = 16 + 12; few chunks, as torch's exports trace
    # every chunk unrolled); then the absolute term folded into the keys of
    # the fused path.
    inputs = keras.Input((None, None, 8))
    x = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding="relative",
        position_size=(5, 5),
        attention_implementation="chunked",
        chunk_size=16,
    )(inputs)
    x = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding="absolute",
        position_size=(5, 5),
        attention_implementation="fused",
    )(x)
    keras.Model(inputs, x).save(path)


def _shape_bug(path):
    inputs = keras.Input((None, None, 8))
    x = keras.layers.Dense(8)(inputs)
    keras.Model(inputs, custom_layers.ScaledWhenShapeUnknown(1.01)(x)).save(path)


def _two_outputs(path):
    # A `--model` case as users run it: no inputs given (the workers make them
    # from the loaded model, at two sizes), and two outputs.
    inputs = keras.Input((None, None, 4), name="image")
    x = keras.layers.Conv2D(6, 1, name="proj")(inputs)
    y = MultiHeadSelfAttention2D(num_heads=2, name="attention")(x)
    keras.Model(inputs, [y, keras.layers.ReLU(name="relu")(x)]).save(path)


def _exporting(case, formats):
    """`case` exported in `formats` (the export feature's options)."""
    return export.FEATURE.apply(case, export.FEATURE.options(export=formats))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    _two_encodings(tmp / "two.keras")
    _shape_bug(tmp / "shapebug.keras")
    _two_outputs(tmp / "made.keras")
    _paths(tmp / "paths.keras")
    tasks = (protocol.FORWARD, protocol.FORWARD64, export.EXPORT)
    to_run = [
        _exporting(
            cases.Case(
                "two",
                None,
                _variants(0),
                model_path=str(tmp / "two.keras"),
                tasks=tasks,
            ),
            export.EXPORT_FORMATS,
        ),
        _exporting(
            cases.Case(
                "shapebug",
                None,
                _variants(1),
                model_path=str(tmp / "shapebug.keras"),
                tasks=tasks,
            ),
            ("litert",),
        ),
        _exporting(
            cases.layer_case(
                "masked",
                schema.preset("yolov4_mhsa", num_heads=2),
                [(2, 5, 6, 16), (1, 4, 7, 16)],
                seed=20,
                mask=True,
                tasks=(protocol.FORWARD, export.EXPORT),
            ),
            ("litert",),
        ),
        _exporting(
            cases.model_case(tmp / "made.keras", name="made", tasks=tasks),
            ("onnx",),
        ),
        _exporting(
            cases.Case(
                "paths",
                None,
                _variants(2),
                model_path=str(tmp / "paths.keras"),
                tasks=tasks,
            ),
            export.EXPORT_FORMATS,
        ),
    ]
    return matrix.run_matrix(to_run, THREE, imports=["custom_layers"])


# (format, exporting backend) -> "pass", or the start of a not-applicable /
# skipped cell's reason (Keras 3.15.1, this install: no torch_xla, jax2onnx or
# litert-torch).
EXPECTED = [
    ("tf_saved_model", "tensorflow", "pass"),
    ("tf_saved_model", "torch", "skipped: needs torch_xla"),
    ("tf_saved_model", "jax", "pass"),
    ("onnx", "tensorflow", "pass"),
    ("onnx", "torch", "pass"),
    ("onnx", "jax", "skipped: needs jax2onnx"),
    ("openvino", "tensorflow", "pass"),
    ("openvino", "torch", "pass"),
    ("openvino", "jax", "n/a: OpenVINO cannot convert jax2tf's XlaCallModule"),
    ("litert", "tensorflow", "pass"),
    ("litert", "torch", "skipped: needs litert_torch"),
    ("litert", "jax", "n/a: Keras 3.15 exports LiteRT from tensorflow and torch only"),
]


@needs_export
@pytest.mark.parametrize("case", ["two", "paths"])
@pytest.mark.parametrize(
    "fmt, backend, expected", EXPECTED, ids=[f"{f}-from-{b}" for f, b, _ in EXPECTED]
)
def test_export_cell(report, case, fmt, backend, expected):
    needs = expected.removeprefix("skipped: needs ")
    if needs != expected and importlib.util.find_spec(needs) is not None:
        pytest.skip(f"{needs} is installed here: this cell is not skipped")
    cell = report.cell(case, f"{fmt} export", backend)
    if expected == "pass":
        assert cell.passed is True, cell
        assert cell.ratio <= 1.0 and cell.budget > 0
    else:
        assert cell.passed is None and cell.note.startswith(expected), cell
        assert "\n" not in cell.note and "Traceback" not in cell.note


@needs_export
def test_every_expected_export_cell_is_there_and_the_run_agrees(report):
    """Every (format, exporting backend) has a cell: a verdict, or why not."""
    two = _exporting(
        cases.Case(
            "two",
            None,
            _variants(0),
            model_path="unused.keras",
            tasks=(protocol.FORWARD, protocol.FORWARD64, export.EXPORT),
        ),
        export.EXPORT_FORMATS,
    )
    expected = {
        c for c in matrix.expected_cells(two, THREE) if c[0].endswith(" export")
    }
    present = {
        (r.check, b)
        for r in report.rows
        if r.case == "two" and r.check.endswith(" export")
        for b in r.cells
    }
    assert expected == present == {(f"{f} export", b) for f, b, _ in EXPECTED}
    # Only the planted bug fails.
    assert {(r.case, r.check, b) for r, b, _ in report.failures} == {
        ("shapebug", "litert export", "tensorflow")
    }


@needs_export
def test_model_with_inputs_made_by_the_workers_and_two_outputs(report):
    """The common `--model M.keras` case: inputs made from the loaded model (at
    8x8 and 6x6); the runtimes return the artifact's first output, and the
    cell says that only it was judged."""
    for backend in ("tensorflow", "torch"):
        cell = report.cell("made", "onnx export", backend)
        assert cell.passed is True, cell
        assert "first output only" in cell.scope, cell
    assert "2x8x8x4, 2x6x6x4" in report.cell("made", "onnx export", "torch").scope


@needs_export
def test_static_exports_say_which_sizes_were_checked(report):
    """Keras's torch ONNX/OpenVINO exports trace at fixed shapes: one export
    per input size, and the cell says so; dynamic exports run every size
    from one artifact."""
    for fmt in ("onnx", "openvino"):
        cell = report.cell("two", f"{fmt} export", "torch")
        assert cell.scope == "static export per size: 2x5x5x8, 2x7x4x8", cell
        assert report.cell("two", f"{fmt} export", "tensorflow").scope == ""
        # The table's text says it (rich markup must not swallow it).
        assert cell_text(cell)[0].endswith(
            " ok (static export per size: 2x5x5x8, 2x7x4x8)"
        )


@needs_export
def test_both_sizes_ran_in_each_runtime(report):
    for backend, fmts in (
        ("tensorflow", export.EXPORT_FORMATS),
        ("torch", ("onnx", "openvino")),
        ("jax", ("tf_saved_model",)),
    ):
        res = report.runs[backend].results["two"][export.EXPORT]
        for fmt in fmts:
            assert str(res[export.export_status_key(fmt)]) == export.EXPORT_OK
            for v, shape in enumerate(SIZES):
                assert res[export.export_key(fmt, v)].shape == shape, (
                    backend,
                    fmt,
                    v,
                )


@needs_export
def test_masked_layer_case_runs_in_litert_at_both_sizes(report):
    cell = report.cell("masked", "litert export", "tensorflow")
    # "auto" with dynamic sizes chooses full or chunked at run time; LiteRT
    # cannot run the chunked loop, so the artifact is the full path's.
    assert cell.passed is True and cell.scope == (
        "exported on the full path: "
        + export.path_fallbacks()[("litert", "tensorflow")][1]
    ), cell
    res = report.runs["tensorflow"].results["masked"][export.EXPORT]
    assert [res[export.export_key("litert", v)].shape for v in (0, 1)] == [
        (2, 5, 6, 16),
        (1, 4, 7, 16),
    ]


FALLBACK_NOTE = "exported on the full path: "


@needs_export
@pytest.mark.parametrize(
    "fmt, backend",
    [(f, b) for f, b, e in EXPECTED if e == "pass"],
    ids=[f"{f}-from-{b}" for f, b, e in EXPECTED if e == "pass"],
)
def test_a_path_an_exporter_cannot_take_falls_back_to_full_and_says_so(
    report, fmt, backend
):
    """The chunked layer of "paths" is exported on the full path exactly
    where `PATH_FALLBACKS` says the format cannot take its loop, and the cell
    says why; elsewhere the artifact keeps the chunked (and fused) path and
    the cell says nothing of it. The default layer ("two": "auto", dynamic
    sizes) falls back only where the format cannot take its by-size choice."""
    paths, why = export.path_fallbacks().get((fmt, backend), ((), ""))
    cell = report.cell("paths", f"{fmt} export", backend)
    if choice.CHUNKED in paths:
        assert cell.scope.endswith(FALLBACK_NOTE + why), cell
    else:
        assert FALLBACK_NOTE not in cell.scope, cell
    by_size = backend == "tensorflow" and choice.BY_SIZE in paths
    assert (
        FALLBACK_NOTE in report.cell("two", f"{fmt} export", backend).scope
    ) == by_size


def test_fallback_paths_are_the_layers_path_names():
    """The table names the layer's paths with the layer's own constants (no
    copy of them), each a path `choice.fallback` takes, for formats and
    backends that exist."""
    assert {p for paths, _ in export.path_fallbacks().values() for p in paths} <= set(
        choice.FALLBACK_PATHS
    )
    assert {fmt for fmt, _ in export.path_fallbacks()} <= set(export.EXPORT_FORMATS)
    assert {b for _, b in export.path_fallbacks()} <= set(protocol.TRAINING_BACKENDS)


@needs_export
def test_an_exported_graph_that_differs_fails(report):
    cell = report.cell("shapebug", "litert export", "tensorflow")
    assert cell.passed is False and cell.ratio > 10, cell
    # The model itself agrees: only its export differs.
    assert report.cell("shapebug", "forward", "tensorflow").passed


@pytest.mark.parametrize("value", ["onnx,tflite", "pt2", ","])
def test_cli_unknown_export_format_exits_2_with_one_line(value):
    if value == ",":  # an empty list is no export at all: not an error
        assert export.validate_formats(value) == ()
        return
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhsa_core.cli",
            "matrix",
            "--export",
            value,
            "--backends",
            "numpy",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "export=" in lines[0] and "Traceback" not in proc.stderr


def test_runtime_process_imports_no_keras(tmp_path):
    """A runtime runs the artifact without the framework that exported it."""
    code = (
        "import sys, mhsa_core.consistency.runtime as r; "
        "print(sorted(m for m in ('keras', 'torch', 'jax', 'tensorflow') "
        "if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "[]", proc.stderr


def test_one_line_of_an_exporter_error():
    text = (
        "Check 'false' failed at src/unconverted_ops_report.cpp:151:\n"
        "Summary:\n-- No conversion rule found for operations: XlaCallModule\n"
    )
    assert (
        export.one_line(text)
        == "-- No conversion rule found for operations: XlaCallModule"
    )
    assert export.one_line("\n  first\nsecond") == "first"


def test_run_matrix_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="Received: export='pt2'"):
        matrix.run_matrix([], THREE, export=["onnx", "pt2"])


def test_assert_backends_agree_refuses_an_unknown_format_before_running(tmp_path):
    from mhsa_core.testing import assert_backends_agree

    path = tmp_path / "shapebug.keras"
    _shape_bug(path)
    with pytest.raises(ValueError, match="Received: export='savedmodel'"):
        assert_backends_agree(path, export=["savedmodel"], imports=["custom_layers"])
