"""Locating a divergence: the first layer whose output leaves its budget.

An opt-in feature (`FEATURE`, `base.Feature`). When a cell of the matrix
fails, `--locate` (`run_matrix(..., locate=True)`) runs a model case (a
user's `.keras` file; our layer alone is one layer) layer by layer on every
backend: the same inputs, and the output of every layer call, in float32
(task LOCATE) and through the float64 clone (task LOCATE64). Each layer call
is then judged as the forward check judges the model's output: against the
float64 oracle (TensorFlow's float64 run, else the median:
`oracles.float64_oracle`) with a peer budget (`budgets.peer_budgets`, from
the backends' own float32-vs-float64 error *of that layer's output*). The
first call, in execution order, that leaves its budget on some backend is
where the divergence starts.

Why the first one in order is enough: calls are ordered so that every call
comes after the calls that produce its inputs (a topological order); at the
first call that leaves its budget, everything it reads was within budget, so
the error started there. The calls after it are off because their inputs
already were (propagation) and are not reported. Running each layer on the
oracle's inputs to isolate it is not done: at the first divergent call it
would tell nothing new, and after it the propagated error is what the user's
model computes.

What is a "layer call":
- functional models: every call of every layer of the model's own graph
  (a layer called twice, shared, has two entries, "name (call 2)");
- Sequential models: every layer of `model.layers`;
- a nested model (a model used as a layer) is one layer call: its own layers
  are not located inside it (run `--locate` on the nested model for that);
- other (subclassed) models cannot be run layer by layer: the section says so.

Two halves: the tasks LOCATE and LOCATE64 (`layer_outputs`) run in the
worker (Keras comes with the task's context; nothing here imports a
framework), `locate_case` and `format_section` run in the parent: the
report's section `NAME` ("locate" in the JSON) and its text after the errors.
A section, not a check row: locate explains failing cells (as a row it would
count the same disagreement twice), and it never changes the verdict.
"""

import dataclasses
import math
import traceback

import numpy as np

from mhsa_core._subprocess import NOT_INSTALLED, tail
from mhsa_core._text import format_table, last_line
from mhsa_core.consistency import budgets, oracles, protocol
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.checks import judge
from mhsa_core.consistency.features.base import Feature
from mhsa_core.consistency.report import Cell, cell_from_json, cell_text, json_cell

__all__ = [
    "FEATURE",
    "NAME",
    "LocateOptions",
    "LOCATE",
    "LOCATE64",
    "LOCATE_TASKS",
    "layer_out_key",
    "layer_outputs",
    "locate_case",
    "locate_cases",
    "format_section",
]

NAME = "locate"  # the feature's name: its report section, its JSON key

# ------------------------------------------------------------ tasks and keys
LOCATE = "locate"  # every layer call's output, in the case's dtype
LOCATE64 = "locate64"  # every layer call's output of the float64 twin
LOCATE_TASKS = (LOCATE, LOCATE64)
# The outputs of every layer call of a model, in execution order
# (`layer_outputs`); call i's output tensor t of variant v is
# `layer_out_key(v, i, t)`.
LAYER_NAMES_KEY = "layer_names"  # 1-D str array: call i's name
LAYER_CLASSES_KEY = "layer_classes"  # 1-D str array: call i's layer class
# A model that cannot be run layer by layer (e.g. a subclassed model), or a
# failure while doing it: the reason, as a 0-d str array (the locate tasks
# never raise: they are a diagnosis, not a check, and must not fail a run).
LOCATE_ERROR_KEY = "locate_error"
LAYER_OUT_PREFIX = "layer/"


def layer_out_key(v, i, t=0):
    """Output tensor t of layer call i, input variant v."""
    return f"{LAYER_OUT_PREFIX}{v}/{i}/{t}"


def layer_of(key):
    """The layer call of a `layer_out_key`, "layer/{v}/{i}/{t}" -> i."""
    return int(key.split("/")[2])


# =================================================================== worker
def _histories(obj):
    """The [layer name, node index, tensor index] of every serialized tensor
    in a functional config's `inbound_nodes` entry."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [tuple(obj["config"]["keras_history"])]
        return [h for v in obj.values() for h in _histories(v)]
    if isinstance(obj, (list, tuple)):
        return [h for v in obj for h in _histories(v)]
    return []


def _functional_calls(config):
    """[(layer name, node index, call name, class name)] of a functional
    model's config, in a topological order: by depth (1 + the deepest call
    an input comes from), then in the config's order."""
    parents, calls = {}, []
    for position, layer in enumerate(config["layers"]):
        # Layers without inbound nodes are the InputLayers: the model's inputs.
        nodes = layer.get("inbound_nodes") or []
        for n, node in enumerate(nodes):
            parents[(layer["name"], n)] = [(name, i) for name, i, _ in _histories(node)]
            name = (
                layer["name"] if len(nodes) == 1 else f"{layer['name']} (call {n + 1})"
            )
            calls.append(
                (position, n, layer["name"], name, layer.get("class_name", "?"))
            )
    # Depths by an explicit depth-first walk (deep models would exceed
    # Python's recursion limit): the config lists each layer once, at its
    # first call, so a shared layer's later call may read calls listed after it.
    depth: dict[tuple[str, int], int] = {}
    for start in parents:
        stack = [start]
        while stack:
            call = stack[-1]
            todo = [p for p in parents.get(call, ()) if p in parents and p not in depth]
            if todo:
                stack += todo
                continue
            stack.pop()
            depth[call] = 1 + max((depth.get(p, 0) for p in parents[call]), default=0)
    calls.sort(key=lambda c: (depth[(c[2], c[1])], c[0], c[1]))
    return [(layer, n, name, cls) for _, n, layer, name, cls in calls]


def _functional_probe(keras, model):
    """A functional model with the same layers and weights as `model` whose
    outputs are every layer call's outputs; and [(call name, class name,
    number of output tensors)]."""
    config = model.get_config()
    calls = _functional_calls(config)
    outputs, entries = [], []
    for layer_name, n, name, cls in calls:
        # Every call of a layer returns the same structure as its first.
        count = len(keras.tree.flatten(model.get_layer(layer_name).output))
        outputs += [[layer_name, n, t] for t in range(count)]
        entries.append((name, cls, count))
    config = {**config, "output_layers": outputs}
    # keras.Model, not the model's class: a functional config revives as a
    # plain functional model whatever subclass saved it.
    probe = keras.Model.from_config(config)
    for layer in model.layers:
        probe.get_layer(layer.name).set_weights(layer.get_weights())
    return probe, entries


def layer_outputs(keras, model, variants, call_inputs):
    """The output of every layer call of `model` on every input variant.

    Args:
        keras: the imported keras module (of this worker's backend).
        model: a functional or Sequential `keras.Model`.
        variants: [[input arrays] per variant], in the model's input order.
        call_inputs: [arrays] -> what `model(...)` takes.

    Returns:
        {LAYER_NAMES_KEY, LAYER_CLASSES_KEY: 1-D str arrays,
        `layer_out_key(v, i, t)`: output t of call i on variant v}.

    Raises:
        ValueError: a model that is neither functional nor Sequential.
    """
    convert = keras.ops.convert_to_numpy
    results = {}
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        entries = [(layer.name, type(layer).__name__) for layer in layers]
        for v, xs in enumerate(variants):
            x = call_inputs(xs)
            for i, layer in enumerate(layers):
                # Keras passes `training` only to layers that take it, and
                # takes the mask from the input tensor (as Sequential.call).
                x = layer(x, training=False)
                for t, out in enumerate(keras.tree.flatten(x)):
                    results[layer_out_key(v, i, t)] = portable(convert(out))
    else:
        config = model.get_config()
        if not isinstance(config, dict) or not {
            "layers",
            "input_layers",
            "output_layers",
        } <= set(config):
            raise ValueError(
                f"--locate runs functional and Sequential models layer by layer; "
                f"{type(model).__name__} {model.name!r} is neither (a subclassed model)"
            )
        probe, counted = _functional_probe(keras, model)
        entries = [(name, cls) for name, cls, _ in counted]
        for v, xs in enumerate(variants):
            outs = probe(call_inputs(xs), training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            k = 0
            for i, (_, _, count) in enumerate(counted):
                for t in range(count):
                    results[layer_out_key(v, i, t)] = portable(convert(outs[k]))
                    k += 1
    results[LAYER_NAMES_KEY] = np.array([name for name, _ in entries], dtype=str)
    results[LAYER_CLASSES_KEY] = np.array([cls for _, cls in entries], dtype=str)
    return results


def error_result(text):
    """The result of a locate task that could not run (a 0-d str array)."""
    return {LOCATE_ERROR_KEY: np.array(tail(text.strip()))}


def _located(ctx, make_model, variants):
    # A diagnosis, not a check: what cannot run layer by layer is reported in
    # the result (LOCATE_ERROR_KEY), never as a failed task.
    try:
        return layer_outputs(ctx.keras, make_model(), variants, ctx.call_inputs)
    except Exception:  # noqa: BLE001
        return error_result(traceback.format_exc())


def locate_task(ctx, options, timings):
    """Task LOCATE: every layer call's output, as the model computes."""
    return _located(ctx, lambda: ctx.model, ctx.variants)


def locate64_task(ctx, options, timings):
    """Task LOCATE64: every layer call's output of the float64 twin."""
    return _located(ctx, ctx.model64, ctx.variants64)


# =================================================================== parent
def _layer_keys(result):
    """{call i: its keys} of one LOCATE result, in call order."""
    groups: dict[int, list[str]] = {}
    for key in protocol.keys_with({"": result}, (LAYER_OUT_PREFIX,)):
        groups.setdefault(layer_of(key), []).append(key)
    return dict(sorted(groups.items()))


def locate_case(case, runs, backends, rtol=None):
    """Judges every layer call of `case` on every backend; the first divergence.

    Args:
        case: a model `cases.Case` that ran tasks LOCATE (and LOCATE64).
        runs: {backend: runner.BackendRun}.
        backends: the report's backends, in order.
        rtol: the user's tolerance (then the oracle is the median float32
            output and the budget rtol x its max, as the forward check's).

    Returns:
        A JSON-ready dict: "case"; "oracle" (what the layers were compared
        with); "backends" (those located); "layers": [{"index", "name",
        "class", "cells": {backend: cell}}] for every call up to and
        including the first divergent one; "checked" (how many calls were
        judged) of "total"; "first_divergence": None or {"index", "name", "class",
        "backends": {backend: ratio}}; "notes": [why a backend is missing].
    """
    notes = []
    results32: dict[str, dict[str, np.ndarray]] = {}
    results64: dict[str, dict[str, np.ndarray]] = {}
    for b in backends:
        run = runs.get(b)
        if run is None:
            continue
        mine = run.results.get(case.name, {})
        if LOCATE not in mine:
            errors = run.errors.get(case.name, {})
            error = errors.get(LOCATE) or errors.get(protocol.SETUP_ERROR) or run.error
            if error and not str(error).startswith(NOT_INSTALLED):
                notes.append(f"{b}: no layer outputs ({last_line(error, 'failed')})")
            continue
        for task, into in ((LOCATE, results32), (LOCATE64, results64)):
            result = mine.get(task)
            if result is None:
                continue
            if LOCATE_ERROR_KEY in result:
                notes.append(
                    f"{b} ({task}): {last_line(result[LOCATE_ERROR_KEY], 'failed')}"
                )
                continue
            into[b] = result
    section = {
        "case": case.name,
        "oracle": None,
        "backends": [],
        "layers": [],
        "checked": 0,
        "total": 0,
        "first_divergence": None,
        "notes": notes,
    }
    if not results32:
        notes.append("no backend ran the model layer by layer")
        return section
    # Every backend must have run the same layer calls (the same file).
    first = next(iter(results32.values()))
    names, classes = list(first[LAYER_NAMES_KEY]), list(first[LAYER_CLASSES_KEY])
    for group in (results32, results64):
        for b in list(group):
            if list(group[b][LAYER_NAMES_KEY]) != names:
                notes.append(
                    f"{b}: other layer calls than {next(iter(results32))}; left out"
                )
                del group[b]
    section["backends"] = [b for b in backends if b in results32]
    keys_of = _layer_keys(first)
    section["total"] = len(keys_of)
    exact = rtol is None and bool(results64)
    for i, keys in keys_of.items():
        oracle = oracles.float64_oracle(results64, keys) if exact else None
        if oracle is not None:
            by_key = budgets.peer_budgets(results32, results64, oracle, keys)
        else:
            oracle = oracles.median_oracle(results32, keys)
            by_key = (
                None
                if oracle is None
                else budgets.peer_budgets(results32, None, oracle, keys, rtol=rtol)
            )
        if section["oracle"] is None:
            section["oracle"] = _oracle_text(exact, results64, rtol)
        cells = {}
        for b, res in results32.items():
            if oracle is None:
                cells[b] = Cell(
                    passed=False, note="no oracle: the backends' shapes differ"
                )
            else:
                cells[b] = judge(res, oracle, keys, by_key)
        section["layers"].append(
            {
                "index": i,
                "name": names[i],
                "class": classes[i],
                "cells": {b: json_cell(c) for b, c in cells.items()},
            }
        )
        section["checked"] += 1
        off = {b: c.ratio for b, c in cells.items() if c.passed is False}
        if off:
            section["first_divergence"] = {
                "index": i,
                "name": names[i],
                "class": classes[i],
                "backends": {
                    b: (r if r is not None and math.isfinite(r) else None)
                    for b, r in off.items()
                },
            }
            break
    return section


def _oracle_text(exact, results64, rtol):
    if exact:
        who = "TensorFlow's" if "tensorflow" in results64 else "the median"
        return f"{who} float64 run, peer budgets"
    if rtol is not None:
        return f"the median float32 output, budget rtol={rtol:g} x max|oracle|"
    return "the median float32 output (no float64 run), budget FLOOR x max|oracle|"


def locate_cases(cases, runs, backends, rtol=None):
    """`locate_case` of every case that has task LOCATE."""
    return [
        locate_case(case, runs, backends, rtol)
        for case in cases
        if LOCATE in case.tasks
    ]


def _ratio_text(ratio):
    if ratio is None:
        return "not finite"
    return f"{ratio:.3g}x"


def format_section(section):
    """The locate section of one case as text: the table of every layer call
    up to the first divergent one, and the line that names it."""
    lines = []
    head = f"locate {section['case']}: "
    if section["checked"] == 0:
        lines.append(head + "not located: " + "; ".join(section["notes"]))
        return "\n".join(lines)
    first = section["first_divergence"]
    if first is None:
        lines.append(
            f"{head}no layer leaves its budget ({section['checked']} layer calls, "
            f"float32 on {', '.join(section['backends'])} against {section['oracle']}; "
            "the forward pass only: gradients, jit and saved files are not located)"
        )
    else:
        backends = section["backends"]
        header = ["#", "layer", "class", *backends]
        rows = []
        for layer in section["layers"]:
            cells = [
                cell_text(cell_from_json(layer["cells"][b]))[0]
                if b in layer["cells"]
                else "-"
                for b in backends
            ]
            rows.append([str(layer["index"]), layer["name"], layer["class"], *cells])
        lines.append(
            f"{head}every layer call's float32 output against {section['oracle']} "
            "(error / budget; <= 1 passes)"
        )
        lines.append(format_table(header, rows))
        where = ", ".join(
            f"{b}: {_ratio_text(r)} its budget" for b, r in first["backends"].items()
        )
        before = (
            "it is the first layer call (its inputs are the model's inputs)"
            if first["index"] == 0
            else "every layer call before it, so its inputs, was within budget"
        )
        lines.append(
            f"first divergence: layer '{first['name']}' ({first['class']}) on "
            f"{where}; {before}"
        )
    lines += [f"  note: {n}" for n in section["notes"]]
    return "\n".join(lines)


# ================================================================== feature
@dataclasses.dataclass(frozen=True)
class LocateOptions:
    """locate: run every model case layer by layer (`--locate`)."""

    locate: bool = False


class _Locate(Feature):
    name = NAME
    Options = LocateOptions
    tasks = {LOCATE: locate_task, LOCATE64: locate64_task}
    # numpy runs the model as it is (float32), not its float64 twin.
    inference_tasks = (LOCATE,)
    model_flag = "--locate"
    examples = ("mhsa-core matrix --model my_model.keras --locate",)

    # Its own keywords only (`features.options` passes no other): narrower
    # than the base's **keywords on purpose.
    def options(self, *, rtol=None, locate=False):  # type: ignore[override]
        return LocateOptions(bool(locate))

    def add_arguments(self, parser):
        parser.add_argument(
            "--locate",
            action="store_true",
            help="also run the model layer by layer on each backend and name the "
            "first layer whose output leaves its budget (after the table)",
        )

    def options_from_args(self, args):
        return LocateOptions(bool(args.locate))

    def apply(self, case, options):
        """Model cases only: our layer alone is one layer."""
        if case.kind != "model":
            return case
        return super().apply(case, options)

    def reads(self, case):
        return LOCATE_TASKS

    def section(self, report, cases, rtol=None):
        return locate_cases(cases, report.runs, report.backends, rtol) or None

    def notes(self, report, options):
        return [format_section(s) for s in report.sections.get(NAME, [])]


FEATURE = _Locate()
