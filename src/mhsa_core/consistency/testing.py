"""`assert_backends_agree`: the cross-backend matrix as a pytest-friendly assertion.

    from mhsa_core.testing import assert_backends_agree

    def test_my_model_is_portable(tmp_path):
        assert_backends_agree(build_my_model(), inputs=my_batch)

Runs the model under each backend in its own process (forward in float32 and
float64, gradients, an SGD and an Adam step, jit, and `.keras` files saved
under each backend loaded under every other) and raises `AssertionError` with
the table of every check when a backend disagrees beyond tolerance, or when
fewer than two backends ran: one backend alone is not agreement
(`skip_if_not_compared=True` skips the test instead).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mhsa_core._typing import Nested
from mhsa_core.consistency import cases, features, matrix
from mhsa_core.consistency.protocol import TRAINING_BACKENDS
from mhsa_core.consistency.report import Report, headline, render, verdict

if TYPE_CHECKING:
    import keras

__all__ = ["assert_backends_agree"]


def _custom_modules(model: keras.Model) -> list[str]:
    """Modules that define the model's non-Keras layers, for the workers to import."""
    modules, stack = set(), [model]
    while stack:
        layer = stack.pop()
        module = type(layer).__module__
        if module.split(".")[0] not in ("keras", "mhsa_core") and module != "__main__":
            modules.add(module)
        stack.extend(getattr(layer, "layers", []))  # nested models
    return sorted(modules)


def assert_backends_agree(
    model_or_path: keras.Model | str | Path,
    inputs: Nested | None = None,
    backends: Sequence[str] = TRAINING_BACKENDS,
    rtol: float | None = None,
    *,
    safe_mode: bool = True,
    imports: Sequence[str] | None = None,
    timeout: float = 1800.0,
    skip_if_not_compared: bool = False,
    locate: bool = False,
    steps: int | None = None,
    optimizer: str | None = None,
    export: Sequence[str] = (),
    **feature_options: Any,
) -> Report:
    """Asserts that `backends` agree on a Keras model; returns the `report.Report`.

    Args:
        model_or_path: a `keras.Model` (saved to a temporary `.keras` file
            first) or the path of a `.keras` file.
        inputs: an array, a list of arrays (in the model's input order) or a
            dict; default: deterministic inputs from the model's input spec.
        backends: the Keras backends to compare; ones not installed are skipped.
        rtol: tolerance relative to max|output|, for models that cannot run in
            float64 (or to override the float64-derived tolerance).
        safe_mode: Keras safe mode when the workers load the file.
        imports: modules the workers import before loading (custom layers);
            default for a model object: the modules of its non-Keras layers.
        timeout: seconds per backend worker.
        skip_if_not_compared: when fewer than two backends ran (the others
            not installed), call `pytest.skip` with the reason instead of
            failing: for test suites that run on installs with one backend.
            Default False: one backend is not agreement.
        locate: also run the model layer by layer on each backend; the
            message then names the first layer whose output leaves its
            budget (`mhsa_core.consistency.features.locate`).
        steps: also train this many optimizer steps on each backend, in float32
            and float64 from the same weights, and fail when a backend drifts
            from the float64 run beyond the peer budget (`features.drift`; the
            "training drift" row). Not with `rtol`.
        optimizer: the optimizer of `steps`: "adam" (default) or "sgd".
        export: formats of `model.export` ("tf_saved_model", "onnx",
            "openvino", "litert"): each backend exports the model in each, the
            artifact runs in its own runtime and is judged like the backends
            (a format a backend cannot export, or whose runtime is not
            installed, is reported, not failed).
        **feature_options: the keywords of other opt-in features
            (`mhsa_core.consistency.features.FEATURES`).

    Raises:
        ValueError: a bad option, before anything is saved or run.
        AssertionError: a check failed, a worker crashed, or fewer than two
            backends ran (nothing was compared); the message has the whole
            table and the verdict.
    """
    keywords = dict(
        locate=locate,
        steps=steps,
        optimizer=optimizer,
        export=export,
        **feature_options,
    )
    options = features.options(rtol=rtol, **keywords)  # before anything runs
    with tempfile.TemporaryDirectory(prefix="mhsa-core-model-") as tmp:
        if isinstance(model_or_path, (str, Path)):
            path = Path(model_or_path)
            imports = list(imports or [])
        else:
            path = Path(tmp) / "model.keras"
            model_or_path.save(path)
            imports = (
                list(imports) if imports is not None else _custom_modules(model_or_path)
            )
        config = cases.read_model_config(path)
        if safe_mode:
            cases.check_safe(config, path)
        case = cases.model_case(path, inputs, name=path.stem)
        report = matrix.run_matrix(
            [case],
            list(backends),
            rtol=rtol,
            safe_mode=safe_mode,
            imports=imports,
            timeout=timeout,
            **keywords,
        )
    if not report.agree:
        if (
            skip_if_not_compared
            and not report.compared
            and not report.failures
            and not (set(report.worker_errors) - set(report.missing))
        ):
            import pytest  # only here: the helper is usable without pytest

            pytest.skip(verdict(report).removeprefix("verdict: "))
        text = io.StringIO()
        render(report, text, headline(report, path.name))
        for backend, error in report.worker_errors.items():
            text.write(f"\n{backend}: {error}\n")
        for feature in features.FEATURES:
            for part in feature.notes(report, options[feature.name]):
                text.write("\n" + part + "\n")
        for feature in features.FEATURES:
            for part in feature.tables(report, options[feature.name]):
                text.write("\n" + part + "\n")
        raise AssertionError(text.getvalue() + "\n" + verdict(report))
    return report
