"""Arrays a test records under each Keras backend, and their verdict across
backends: the data half of the pytest plugin (`pytest_plugin`).

- `BackendOutputs`: the `backend_outputs` fixture's object. A test records
  named arrays (`record("logits", y)`), or a model's output on its inputs
  (`record("y", model=model, inputs=x)`), which also records the output of
  the model's float64 twin (`float64.float64_clone`), the matrix's oracle.
- One `.npz` file per test and backend (`save`, `load_dir`): its arrays and,
  as a 0-d string array, what they are (names, float64 runs, rtol).
- `judge`: one test's records from every backend, judged by the matrix's own
  checks (`checks.CHECKS`' "forward" and "forward float64", through a
  `checks.CaseContext`): a `report.Report` with a row per recorded array, so
  the rule, the table and the verdict are the matrix's. An array recorded on
  fewer than two backends is "not compared", with why.

The oracle and budget of a recorded array, as the matrix gives a user model:
with a model, TensorFlow's float64 run (else the median of the float64 runs)
and `PEER_FACTOR` x the backends' own float32 error + `FLOOR` x max|oracle|,
and a strict float64 row; without one, the median of the backends' results
and `FLOOR` x max|oracle| (the matrix's peer rule with no float64 run), or
`rtol` x max|oracle| when the test gives `rtol`.

Imports NumPy; Keras only in `BackendOutputs.record` (a worker, or a test
that already runs Keras).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mhsa_core._typing import Nested
from mhsa_core.consistency import protocol
from mhsa_core.consistency.arrays import portable

__all__ = ["Record", "BackendOutputs", "save", "load_dir", "judge", "Judgement"]

# The rows of a recorded array, by the matrix check each one is.
ROW_TITLES = {"forward": "as recorded", "forward float64": "float64 twin"}
_META = "meta"  # the npz entry that says what the arrays are


@dataclasses.dataclass
class Record:
    """One recorded array (or structure of arrays) on one backend.

    Attributes:
        name: the name the test gave it.
        values: its arrays (the leaves of a structure, in `keras.tree` order).
        values64: the float64 twin's output on the same inputs, or None.
        rtol: the budget relative to max|oracle| the test asked for, or None.
        quantization: the Keras quantization modes of the recorded model
            (`cases.quantization_of`: "int8", ...), or None: judged with the
            matrix's quantized rule (one int8 step of slack).
    """

    name: str
    values: list[np.ndarray]
    values64: list[np.ndarray] | None = None
    rtol: float | None = None
    quantization: str | None = None


class BackendOutputs:
    """Named arrays of one test, compared across Keras backends by the pytest
    plugin (`pytest --keras-backends tensorflow,torch,jax`).

    Without `--keras-backends` it records nothing: `record` checks its
    arguments and returns, and the test runs as it would without it.

    Attributes:
        backend: the Keras backend of this process when the plugin runs the
            test in a backend worker, else None.
        records: what was recorded, in order (empty when not recording).
    """

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend
        self.records: list[Record] = []
        self._names: set[str] = set()

    @property
    def recording(self) -> bool:
        """Whether this test runs in a backend worker (its records are kept)."""
        return self.backend is not None

    def record(
        self,
        name: str,
        value: Nested | None = None,
        *,
        model: Any = None,
        inputs: Nested | None = None,
        rtol: float | None = None,
    ) -> None:
        """Records `value` under `name`, to be compared across backends.

        Args:
            name: the array's name in the report, unique within the test.
            value: an array or tensor, or a list, tuple or dict of them.
                Default with `model`: `model(inputs, training=False)`.
            model: a built Keras model or layer whose output on `inputs`
                `value` is: its float64 twin (same config in float64, weights
                cast exactly) then gives the oracle and the budget, as in the
                matrix. Needs `inputs`.
            inputs: the inputs of `model` (an array, list or dict).
            rtol: judge against the median of the backends with a budget of
                rtol x max|oracle| (the matrix's `--rtol`), for computations
                without a float64 twin; default: the float64 twin with
                `model`, else 1e-6 x max|oracle| (float32 resolution).

        Raises:
            ValueError: a bad argument (an empty or repeated name, `model`
                without `inputs`, a value that is no numeric array).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"`name` must be a non-empty string. Received: name={name!r}"
            )
        if name in self._names:
            raise ValueError(
                f"`name` must be unique within a test: {name!r} was recorded "
                f"already. Received: name={name!r}"
            )
        if (model is None) != (inputs is None):
            raise ValueError(
                "`model` and `inputs` go together (the float64 twin runs the model "
                f"on the inputs). Received: model={model!r}, inputs="
                f"{'None' if inputs is None else type(inputs).__name__}"
            )
        if value is None and model is None:
            raise ValueError(
                "Give a `value` to record, or a `model` and its `inputs`. "
                "Received: value=None, model=None"
            )
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(
                f"`rtol` must be a positive number or None. Received: rtol={rtol!r}"
            )
        if value is not None:
            values = _leaves(value, "value")
        self._names.add(name)
        if not self.recording:
            return  # outside a backend worker: checked, not kept
        values64 = None
        quantization = None
        if model is not None:
            from mhsa_core.consistency.cases import quantization_of

            quantization = quantization_of(model.get_config())
            # The float32 run and the float64 twin, as `within_budget` runs
            # them (one rule for "the model in float64").
            from mhsa_core.consistency.budget_check import _runs

            own, high = _runs(model, inputs)
            if value is None:
                values = [portable(a) for a in own]
            # Keras's numpy backend computes float64 in float32 in places:
            # the matrix runs no float64 task there (`protocol.backend_tasks`).
            if protocol.FORWARD64 in protocol.backend_tasks(
                self.backend, [protocol.FORWARD64]
            ):
                values64 = [portable(a) for a in high]
        self.records.append(Record(name, values, values64, rtol, quantization))


def _leaves(structure: Nested, what: str) -> list[np.ndarray]:
    """The numeric arrays of `structure`, as NumPy."""
    leaves = _flatten(structure)
    if not leaves:
        raise ValueError(f"`{what}` holds no arrays. Received: {what}={structure!r}")
    arrays = []
    for leaf in leaves:
        if isinstance(leaf, (np.ndarray, np.generic, int, float, str)):
            array = np.asarray(leaf)
        else:  # a backend tensor: this test runs Keras already
            import keras

            array = np.asarray(keras.ops.convert_to_numpy(leaf))
        array = portable(array)  # bfloat16 -> float32, exactly (.npz holds it)
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"`{what}` must hold numeric arrays. Received: {what} with dtype "
                f"{array.dtype}"
            )
        arrays.append(array)
    return arrays


def _flatten(structure: Nested) -> list[Any]:
    """The leaves of a list, tuple or dict (sorted keys, as `keras.tree`)."""
    if isinstance(structure, dict):
        return [leaf for k in sorted(structure) for leaf in _flatten(structure[k])]
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _flatten(item)]
    return [] if structure is None else [structure]


# ------------------------------------------------------------------ files
def file_name(nodeid: str) -> str:
    """The file of one test's records in a backend's directory."""
    return hashlib.sha1(nodeid.encode()).hexdigest()[:20] + ".npz"


def save(directory: Path, nodeid: str, records: Sequence[Record]) -> None:
    """Writes one test's records to `directory` (nothing when there are none)."""
    if not records:
        return
    arrays: dict[str, Any] = {}
    entries = []
    for r, record in enumerate(records):
        for o, array in enumerate(record.values):
            arrays[f"{r}/{o}"] = array
        for o, array in enumerate(record.values64 or []):
            arrays[f"{r}/{o}/64"] = array
        entries.append(
            {
                "name": record.name,
                "outputs": len(record.values),
                "float64": record.values64 is not None,
                "rtol": record.rtol,
                "quantization": record.quantization,
            }
        )
    arrays[_META] = np.array(json.dumps({"nodeid": nodeid, "records": entries}))
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / file_name(nodeid), **arrays)


def load_dir(directory: Path) -> dict[str, dict[str, Record]]:
    """{nodeid: {name: Record}} of every test's records in `directory`."""
    found: dict[str, dict[str, Record]] = {}
    for path in sorted(Path(directory).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_META]))
            records = {}
            for r, entry in enumerate(meta["records"]):
                n = entry["outputs"]
                records[entry["name"]] = Record(
                    entry["name"],
                    [data[f"{r}/{o}"] for o in range(n)],
                    [data[f"{r}/{o}/64"] for o in range(n)]
                    if entry["float64"]
                    else None,
                    entry["rtol"],
                    entry.get("quantization"),
                )
        found[meta["nodeid"]] = records
    return found


# ---------------------------------------------------------------- verdict
@dataclasses.dataclass
class Judgement:
    """One test's records across backends.

    Attributes:
        report: the matrix's `report.Report`, a row per recorded array and
            check (rendered with `report.render`).
        not_compared: what was not compared and why, one line each.
    """

    report: Any
    not_compared: list[str]

    @property
    def status(self) -> str:
        """ "disagree", "agree", "not compared" or "nothing recorded"."""
        if self.report.failures:
            return "disagree"
        if self.report.compared:
            return "agree"
        return "not compared" if self.not_compared else "nothing recorded"

    def text(self, subject: str) -> str:
        """The table, its notes and the verdict, as the matrix prints them."""
        import io

        from mhsa_core.consistency.report import headline, render, verdict

        out = io.StringIO()
        if self.report.rows:
            title = headline(self.report, subject)
            render(self.report, out, title, header=("array", "check"))
        lines = [out.getvalue().rstrip()] if self.report.rows else []
        if self.report.compared or self.report.failures:
            lines.append(verdict(self.report))
        lines += [f"not compared: {why}" for why in self.not_compared]
        return "\n".join(line for line in lines if line)


def judge(
    backends: Sequence[str],
    records: dict[str, dict[str, Record]],
    absent: dict[str, str] | None = None,
) -> Judgement:
    """One test's records judged across `backends` by the matrix's checks.

    Args:
        backends: the backends the test ran on, in report order.
        records: {backend: {name: Record}} of that test.
        absent: {backend: why it recorded nothing} ("failed", "passed
            without recording it"), for the "not compared" lines.

    Returns:
        A `Judgement`: the report (a row per array and check) and what was
        not compared.
    """
    from mhsa_core.consistency import checks
    from mhsa_core.consistency.report import Cell, Report, Row

    absent = absent or {}
    names = list(dict.fromkeys(n for b in backends for n in records.get(b, {})))
    rows, notes, not_compared = [], [], []
    for name in names:
        present = [b for b in backends if name in records.get(b, {})]
        if len(present) < 2:
            rows.append(
                Row(name, ROW_TITLES["forward"], {present[0]: Cell(None, note="alone")})
            )
            not_compared.append(f"{name}: {_alone(present[0], backends, absent)}")
            continue
        first = records[present[0]][name]
        rtol = first.rtol
        # What `CaseContext` reads of a `runner.BackendRun`: its results.
        runs = {
            b: types.SimpleNamespace(results={name: _results(records[b][name])})
            for b in present
        }
        # The matrix's model case with one input variant; its outputs are
        # the record's arrays (`protocol.output_key(0, o)`).
        case = types.SimpleNamespace(
            name=name,
            kind="model",
            dtype="float32",
            variants=[{}],
            tasks=(),
            quantization=first.quantization,
        )
        ctx = checks.CaseContext(case, runs, present, rtol=rtol)
        outputs = max(len(records[b][name].values) for b in present)
        labels = {protocol.output_key(0, o): f"{name}[{o}]" for o in range(outputs)}
        for check in checks.CHECKS:
            if check.name not in ROW_TITLES:
                continue
            for row in check.rows(ctx):
                cells = {
                    b: dataclasses.replace(c, note=labels.get(c.note, c.note))
                    for b, c in row.cells.items()
                }
                rows.append(Row(name, ROW_TITLES[check.name], cells))
        notes += _oracle_notes(ctx, name, rtol)
        missing = [b for b in backends if b not in present]
        if missing:
            why = "; ".join(
                f"{b} {absent.get(b, 'did not record it')}" for b in missing
            )
            not_compared.append(f"{name}: not compared on {', '.join(missing)} ({why})")
    report = Report(backends=list(backends), rows=rows, worker_errors={}, notes=notes)
    return Judgement(report, not_compared)


def _results(record: Record) -> dict[str, dict[str, np.ndarray]]:
    keys = [protocol.output_key(0, o) for o in range(len(record.values))]
    results = {protocol.FORWARD: dict(zip(keys, record.values))}
    if record.values64 is not None:
        results[protocol.FORWARD64] = dict(zip(keys, record.values64))
    return results


def _alone(backend: str, backends: Sequence[str], absent: dict[str, str]) -> str:
    if len(backends) == 1:
        return f"only {backend} was selected (--keras-backends)"
    others = [b for b in backends if b != backend]
    why = "; ".join(f"{b} {absent.get(b, 'did not record it')}" for b in others)
    return f"recorded on {backend} only ({why})"


def _oracle_notes(ctx: Any, name: str, rtol: float | None) -> list[str]:
    """What `name` was compared with, in the matrix's words, and its budget
    (two lines: the table's notes stay within 80 columns)."""
    from mhsa_core.consistency.budgets import FLOOR, PEER_FACTOR
    from mhsa_core.consistency.checks import _describe_oracle

    forward = ctx.forward
    results = ctx.results(protocol.FORWARD64 if forward.float64 else protocol.FORWARD)
    where = _describe_oracle(name, results, forward.float64, ctx.backends)
    if rtol is not None:
        budget = f"rtol {rtol:g} x max|oracle|"
    elif forward.float64:
        budget = (
            f"{PEER_FACTOR:g} x the backends' own float32 error + "
            f"{FLOOR:g} x max|oracle|"
        )
    else:
        budget = (
            f"{FLOOR:g} x max|oracle| (no float64 twin: record with model= and "
            "inputs=, or give rtol=)"
        )
    return [where, f"{name}: budget {budget}"]
