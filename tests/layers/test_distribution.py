"""The layer inside each framework's own distributed engine, on simulated CPU devices.

Each engine runs once in `make test`, in the lane of its backend, in a
subprocess of its own (`_distributed_runs.py`: the devices must be set up
before the framework is imported):

| lane       | engine                                                         |
| ---------- | -------------------------------------------------------------- |
| jax        | keras.distribution: DataParallel (8 devices), ModelParallel    |
|            | (2x4 mesh, heads across "model"); plus the layout rules        |
| tensorflow | tf.distribute.MirroredStrategy over 2 logical CPU devices      |
| torch      | DistributedDataParallel, gloo, 2 processes, a plain torch loop |

Every distributed run must end STEPS SGD steps with the weights of the
undistributed run, judged by the project's peer rule against that run in
float64 (`judge` below, docs/tolerances.md), and must really be
distributed (shardings, mirrored copies, world size).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest

import mhsa_core
from mhsa_core import MultiHeadSelfAttention2D
from mhsa_core.consistency.budgets import FLOOR, PEER_FACTOR, max_abs
from mhsa_core.distribution import layout_map, layout_rules

# Distributed runs in processes of their own (seconds each).
pytestmark = pytest.mark.slow

BACKEND = keras.backend.backend()
RUNS = Path(__file__).with_name("_distributed_runs.py")
SRC = str(Path(mhsa_core.__file__).resolve().parents[1])

# engine (= lane) -> the distributed runs it reports, judged against its
# undistributed run.
DISTRIBUTED_RUNS = {
    "jax": ("data_parallel", "model_parallel"),
    "tensorflow": ("mirrored",),
    "torch": ("ddp", "ddp_rank1"),
}


def _lane(engine):
    return pytest.mark.skipif(
        BACKEND != engine,
        reason=f"the {engine} engine runs once, in the KERAS_BACKEND={engine} lane",
    )


def _engine_unavailable(engine):
    """Why `engine` cannot run here, or None."""
    if engine == "torch":
        import torch.distributed

        if not (
            torch.distributed.is_available() and torch.distributed.is_gloo_available()
        ):
            return "this torch build has no torch.distributed gloo backend"
    return None


_REPORTS = {}


def report(engine):
    """The JSON of `_distributed_runs.py engine`, run once per test session
    (a failed run too: every test that needs it fails with its stderr)."""
    why = _engine_unavailable(engine)
    if why:
        pytest.skip(why)
    if engine not in _REPORTS:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [SRC] + [p for p in [os.environ.get("PYTHONPATH")] if p]
            ),
        }
        for name in ("XLA_FLAGS", "JAX_ENABLE_X64", "KERAS_BACKEND"):
            env.pop(name, None)  # the script sets them for its engine
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, str(RUNS), engine]
            if engine in RECIPE_IN_RUNS:
                # The docs recipe's train() runs in the DDP runner's ranks.
                command.append(str(_write_recipe(engine, Path(tmp))))
            _REPORTS[engine] = subprocess.run(
                command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp
            )
    proc = _REPORTS[engine]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def judge(out, run):
    """(error, budget) of `out[run]`'s weight changes: max|delta - delta64|
    over all weights, within PEER_FACTOR x the undistributed float32 run's
    own error + FLOOR x max|delta64| (docs/tolerances.md, the peer rule with
    this engine as the only peer)."""

    def flat(key):
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in out[key]])

    oracle = flat("float64")
    rounding = max_abs(flat("float32"), oracle)
    budget = PEER_FACTOR * rounding + FLOOR * float(np.max(np.abs(oracle)))
    return max_abs(flat(run), oracle), budget, float(np.max(np.abs(oracle)))


CASES = [
    pytest.param(engine, run, marks=_lane(engine), id=f"{engine}-{run}")
    for engine, runs in DISTRIBUTED_RUNS.items()
    for run in runs
]


@pytest.mark.parametrize("engine,run", CASES)
def test_distributed_fit_equals_undistributed(engine, run):
    out = report(engine)
    error, budget, trained = judge(out, run)
    # The verdict has teeth: the budget is under 1% of what training moved
    # the weights (measured: 0.002%), so a run whose steps are off by 1% of
    # the training signal (a mis-averaged gradient, a lost step) fails.
    assert trained > 100 * budget, (trained, budget)
    assert error <= budget, (
        f"{run}: weight changes {error:.3g} from the float64 undistributed run, "
        f"budget {budget:.3g} (ratio {error / budget:.3g})"
    )


# ------------------------------------------------------------------ JAX
QKV = re.compile(r".*/(query|key|value)_(kernel|bias)")
OUTPUT_KERNEL = re.compile(r".*/output_kernel")
# The test model's weights: 8 of "conv"; 8 of "relative" + 4 of its q/k
# norms, 2 of its output norm, 2 of its output projection.
MODEL_WEIGHTS = 24


def _expected_sharding(path, shape, run):
    """[spec, shard shape on one device] of a variable of the test model."""
    if run == "model_parallel" and QKV.fullmatch(path):
        spec = [None, "model"] if len(shape) == 2 else ["model"]
        return [spec, [*shape[:-1], shape[-1] // 4]]  # 4 = the model axis
    if run == "model_parallel" and OUTPUT_KERNEL.fullmatch(path):
        return [["model", None], [shape[0] // 4, shape[1]]]  # rows: the heads
    return [[None] * len(shape), list(shape)]  # replicated


@_lane("jax")
@pytest.mark.parametrize("run", DISTRIBUTED_RUNS["jax"])
def test_jax_variables_are_sharded_as_the_rules_say(run):
    out = report("jax")
    assert out["devices"] == 8
    shardings = out[f"{run}_sharding"]
    assert len(shardings) == MODEL_WEIGHTS
    for path, (spec, shard, shape) in shardings.items():
        assert [spec, shard] == _expected_sharding(path, shape, run), path


@_lane("jax")
def test_jax_model_parallel_rejects_num_heads_not_divisible():
    message = report("jax")["bad_heads_error"]
    assert message is not None, "num_heads=6 on a model axis of 4 built without error"
    assert message.endswith("Received: num_heads=6, model axis size=4"), message
    # A layout that splits only the output projection's rows is checked too.
    message = report("jax")["bad_heads_rows_error"]
    assert message is not None, "output_kernel's rows split 4 ways for 6 heads"
    assert "the rows of output_kernel" in message, message
    assert message.endswith("Received: num_heads=6, model axis size=4"), message


# Which rule each of the layer's weights falls under, for every encoding
# and every option that adds weights.
RULES = [
    ("none", {}),
    ("conv", {"activation": "relu"}),
    ("sinusoidal", {}),
    ("relative", {"position_size": (4, 4)}),
    ("absolute", {"position_size": (4, 4)}),
    ("none", {"qk_norm": "layer", "output_norm": "layer", "output_dense": True}),
    ("none", {"qk_norm": "rms", "use_key_bias": False, "output_dense": True}),
    ("none", {"use_bias": False, "output_dense": True}),
    ("relative_bias", {"window_size": 2}),
    ("rope_mixed", {}),
]
RULE_IDS = [
    "-".join([encoding, *(f"{k}={v}" for k, v in kwargs.items())])
    for encoding, kwargs in RULES
]


@_lane("jax")
@pytest.mark.parametrize("encoding,kwargs", RULES, ids=RULE_IDS)
def test_layout_rules_cover_every_weight_once(encoding, kwargs):
    layer = MultiHeadSelfAttention2D(
        num_heads=4, position_encoding=encoding, name="attn", **kwargs
    )
    layer.build((None, 4, 4, 16))
    rules = layout_rules(model_axis="m")
    for v in layer.weights:
        matches = [
            axes for pattern, axes in rules.items() if re.fullmatch(pattern, v.path)
        ]
        expected = (
            (None, "m")
            if QKV.fullmatch(v.path) and len(v.shape) == 2
            else ("m",)
            if QKV.fullmatch(v.path)
            else ("m", None)
            if OUTPUT_KERNEL.fullmatch(v.path)
            else (None,) * len(v.shape)
        )
        assert matches == [expected], v.path
    # Another layer's variables are left to the user's rules.
    assert not any(re.fullmatch(p, "dense/kernel") for p in rules)
    assert not any(re.fullmatch(p, "mha/query/kernel") for p in rules)
    # layer_path narrows the rules to some layers.
    narrow = layout_rules(layer_path="encoder/attn_.*")
    assert any(re.fullmatch(p, "encoder/attn_2/query_kernel") for p in narrow)
    assert not any(re.fullmatch(p, "attn/query_kernel") for p in narrow)


@_lane("jax")
def test_layout_map_adds_to_a_users_map_and_checks_the_mesh():
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)
    theirs = keras.distribution.LayoutMap(mesh)
    theirs["dense.*kernel"] = (None, "model")
    result = layout_map(mesh, layout_map=theirs)
    assert result is theirs and len(theirs) == 1 + len(layout_rules())
    assert theirs["attn/key_kernel"].axes == (None, "model")
    assert theirs["attn/output_kernel"].axes == ("model", None)
    assert theirs["attn/query_norm_scale"].axes == (None,)
    assert theirs["attn/relative_width"].axes == (None, None)
    with pytest.raises(ValueError, match=r"Received: model_axis='heads'$"):
        layout_map(mesh, model_axis="heads")
    other = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)
    with pytest.raises(ValueError, match="same `device_mesh`"):
        layout_map(mesh, layout_map=keras.distribution.LayoutMap(other))
    with pytest.raises(ValueError, match=r"Received: layer_path=''$"):
        layout_rules(layer_path="")


# ----------------------------------------------------------- TensorFlow
@_lane("tensorflow")
def test_tensorflow_variables_are_mirrored_on_both_devices():
    out = report("tensorflow")
    assert out["devices"] == 2
    assert len(out["mirrored_copies"]) == MODEL_WEIGHTS
    for path, (kind, devices) in out["mirrored_copies"].items():
        assert kind == "MirroredVariable", path
        assert [d.rsplit(":", 2)[-2:] for d in devices] == [
            ["CPU", "0"],
            ["CPU", "1"],
        ], path


# -------------------------------------------------------------- PyTorch
@_lane("torch")
def test_torch_ddp_ran_on_two_processes():
    out = report("torch")
    assert out["world_size"] == 2
    # Both ranks end with the same weights (DDP's all-reduce), checked above
    # against the oracle each; here against each other, exactly.
    assert out["ddp"] == out["ddp_rank1"]


# ------------------------------------------- the recipes of docs/scaling.md
RECIPES_PAGE = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
# lane -> (the recipe's first comment line, what it prints when it worked)
RECIPES = {
    "jax": (
        "Scaling out on JAX: keras.distribution, heads sharded across devices",
        "P(None, 'model')",
    ),
    "tensorflow": (
        "Scaling out on TensorFlow: tf.distribute.MirroredStrategy",
        "2 replicas",
    ),
    "torch": (
        "Scaling out on PyTorch: DistributedDataParallel (run as a script)",
        "on 2 processes",
    ),
}
_PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)


def _recipe(block_id):
    """The code of docs/scaling.md's ```python block that starts with `# block_id`."""
    for code in _PYTHON_BLOCK.findall(RECIPES_PAGE.read_text(encoding="utf-8")):
        if code.lstrip().startswith(f"# {block_id}\n"):
            return code
    pytest.fail(f"no ```python block starting with '# {block_id}' in {RECIPES_PAGE}")


def _write_recipe(engine, directory):
    script = directory / "recipe.py"  # a name that shadows no module
    script.write_text(_recipe(RECIPES[engine][0]), encoding="utf-8")
    return script


# The torch recipe's train() runs inside the DDP runner's two ranks (all of it
# but its mp.spawn line): two more processes importing keras would take the
# torch lane past its minute. The others run as scripts of their own.
RECIPE_IN_RUNS = ("torch",)


@pytest.mark.parametrize("engine", [pytest.param(e, marks=_lane(e)) for e in RECIPES])
def test_scaling_recipe_runs(engine, tmp_path):
    printed = RECIPES[engine][1]
    if engine in RECIPE_IN_RUNS:
        out = report(engine)
        assert out["recipe_error"] is None, out["recipe_error"]
        assert out["recipe_rank1_error"] is None, out["recipe_rank1_error"]
        assert printed in out["recipe_stdout"], out["recipe_stdout"]
        return
    why = _engine_unavailable(engine)
    if why:
        pytest.skip(why)
    script = _write_recipe(engine, tmp_path)
    env = {**os.environ, "PYTHONPATH": SRC}
    for name in ("XLA_FLAGS", "JAX_ENABLE_X64", "KERAS_BACKEND"):
        env.pop(name, None)  # the recipe sets its own
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert printed in proc.stdout, proc.stdout[-2000:]
