"""The training runs behind tests/layers/test_distribution.py, one engine per process.

    python _distributed_runs.py jax|tensorflow|torch   ->  one JSON line on stdout
    python _distributed_runs.py torch RECIPE.py         ... and docs/scaling.md's torch
                                                        recipe's train() in both ranks

Each engine needs its set-up before its framework is imported (virtual
devices, logical devices, a process group), hence a process of its own. Every
engine trains the same tiny model (two MultiHeadSelfAttention2D layers: the
"conv" encoding with ReLU projections, the legacy block's kind, then BoTNet's
"relative" one with timm's options: q/k LayerNorms, the output LayerNorm and
the output projection, whose kernel ModelParallel splits by rows) from the
same NumPy weights on the same batch, for STEPS full-batch SGD steps, and
reports the weight changes of:

- "float64": undistributed, float64 (the oracle of the peer budget rule);
- "float32": undistributed, float32 (its distance from the oracle is what
  float32 rounding does to this training: the budget's measure);
- one entry per distributed run, float32.

The test judges them (`judge`) with the project's peer rule
(docs/tolerances.md): error = max|delta - delta64| over all weights, budget =
PEER_FACTOR x max|delta32 - delta64| + FLOOR x max|delta64|. Weight *changes*
are judged, not weights: the start weights are the same everywhere and would
only dilute the scale.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np

SHAPE = (8, 4, 4, 16)  # (B, H, W, C): 8 = one example per virtual JAX device
NUM_HEADS = 4  # = the model-axis size of the 2x4 mesh: one head per device
STEPS = 3
LEARNING_RATE = 0.1


def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)


def start_weights(shapes):
    """Kernels and tables ~ N(0, 1/rows), vectors ~ N(0, 0.1^2), from NumPy
    (the same Keras seed gives different weights per backend). A norm's
    scale is a vector too: small scales only shrink the logits."""
    rng = np.random.default_rng(1)
    return [
        rng.standard_normal(s) / np.sqrt(s[0])
        if len(s) == 2
        else 0.1 * rng.standard_normal(s)
        for s in shapes
    ]


def build(dtype):
    import keras

    from mhsa_core import MultiHeadSelfAttention2D

    inputs = keras.Input(SHAPE[1:], dtype=dtype)
    h = MultiHeadSelfAttention2D(
        num_heads=NUM_HEADS,
        activation="relu",
        position_encoding="conv",
        name="attn_conv",
        dtype=dtype,
    )(inputs)
    h = MultiHeadSelfAttention2D(
        num_heads=NUM_HEADS,
        position_encoding="relative",
        qk_norm="layer",
        output_norm="layer",
        output_dense=True,
        name="attn_relative",
        dtype=dtype,
    )(h)
    model = keras.Model(inputs, h)
    model.set_weights(
        [
            w.astype(dtype)
            for w in start_weights([tuple(v.shape) for v in model.weights])
        ]
    )
    return model


def deltas(model, dtype="float32"):
    start = start_weights([tuple(v.shape) for v in model.weights])
    # The start weights as the run stored them (float32-rounded in float32).
    return [
        (np.asarray(v, np.float64) - w.astype(dtype).astype(np.float64)).tolist()
        for v, w in zip(model.get_weights(), start)
    ]


def float64_run(model):
    """The float64 run's deltas, after checking it was float64 (JAX without
    64-bit mode would silently make it float32, and no oracle)."""
    dtypes = sorted({str(v.dtype) for v in model.weights})
    if dtypes != ["float64"]:
        raise RuntimeError(f"the float64 run has weights of dtypes {dtypes}")
    return deltas(model, "float64")


def keras_fit(dtype, scope=None):
    """STEPS full-batch SGD steps of `fit`, optionally under a distribution
    scope (model, optimizer and fit all inside it, as Keras requires)."""
    import contextlib

    import keras

    x, y = batch()
    with scope() if scope is not None else contextlib.nullcontext():
        model = build(dtype)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
        model.fit(
            x.astype(dtype),
            y.astype(dtype),
            batch_size=SHAPE[0],
            epochs=STEPS,
            shuffle=False,
            verbose=0,
        )
    return model


# ------------------------------------------------------------------- JAX
def run_jax():
    import keras

    from mhsa_core.distribution import layout_map

    devices = keras.distribution.list_devices()
    out = {"devices": len(devices)}
    out["float64"] = float64_run(keras_fit("float64"))
    out["float32"] = deltas(keras_fit("float32"))

    data_parallel = keras.distribution.DataParallel(devices=devices)
    model = keras_fit("float32", data_parallel.scope)
    out["data_parallel"] = deltas(model)
    out["data_parallel_sharding"] = shardings(model)

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch"
    )
    model = keras_fit("float32", model_parallel.scope)
    out["model_parallel"] = deltas(model)
    out["model_parallel_sharding"] = shardings(model)

    # num_heads=6 on a model axis of 4: the layer refuses at build.
    try:
        with model_parallel.scope():
            from mhsa_core import MultiHeadSelfAttention2D

            MultiHeadSelfAttention2D(num_heads=6)(keras.Input((4, 4, 24)))
        out["bad_heads_error"] = None
    except ValueError as e:
        out["bad_heads_error"] = str(e)
    # The same, from a user's layout that splits only the output kernel's rows.
    rows_only = keras.distribution.LayoutMap(mesh)
    rows_only[".*/output_kernel"] = ("model", None)
    try:
        with keras.distribution.ModelParallel(
            layout_map=rows_only, batch_dim_name="batch"
        ).scope():
            from mhsa_core import MultiHeadSelfAttention2D

            MultiHeadSelfAttention2D(num_heads=6, output_dense=True)(
                keras.Input((4, 4, 24))
            )
        out["bad_heads_rows_error"] = None
    except ValueError as e:
        out["bad_heads_rows_error"] = str(e)
    return out


def shardings(model):
    """{variable path: [partition spec, shape of the shard on device 0, shape]}."""
    out = {}
    for v in model.weights:
        value = v.value
        spec = [None if a is None else str(a) for a in value.sharding.spec]
        spec += [None] * (len(v.shape) - len(spec))  # P() may omit trailing Nones
        out[v.path] = [
            spec,
            list(value.addressable_shards[0].data.shape),
            list(v.shape),
        ]
    return out


# ------------------------------------------------------------ TensorFlow
def run_tensorflow():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"devices": strategy.num_replicas_in_sync}
    out["float64"] = float64_run(keras_fit("float64"))
    out["float32"] = deltas(keras_fit("float32"))
    model = keras_fit("float32", strategy.scope)
    out["mirrored"] = deltas(model)
    # Each variable a MirroredVariable with a copy on each logical device.
    out["mirrored_copies"] = {
        v.path: [
            type(v.value).__name__,
            sorted(c.device for c in strategy.experimental_local_results(v.value)),
        ]
        for v in model.weights
    }
    return out


# --------------------------------------------------------------- PyTorch
WORLD_SIZE = 2


def torch_train(model, x, y, ddp=False):
    """STEPS steps of plain-torch SGD on (x, y): the Keras model is an nn.Module."""
    import torch

    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.mean((net(x) - y) ** 2)
        loss.backward()
        optimizer.step()


def torch_rank(rank, port, queue, recipe):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        result = torch_runs(rank)
        result["world_size"] = dist.get_world_size()
    finally:
        dist.destroy_process_group()
    if recipe:
        result.update(torch_recipe(recipe, rank))
    queue.put((rank, result))


def torch_runs(rank):
    import torch

    x, y = (torch.tensor(a, dtype=torch.float32) for a in batch())
    shard = slice(rank * SHAPE[0] // WORLD_SIZE, (rank + 1) * SHAPE[0] // WORLD_SIZE)
    model = build("float32")
    if rank == 1:
        # Other start weights on rank 1: DDP's start-up broadcast of rank 0's
        # parameters must reach the Keras variables (else rank 1 ends
        # elsewhere and fails its check).
        model.set_weights([w + 1.0 for w in model.get_weights()])
    # Each rank its half of the batch; DDP averages the gradients, so the
    # step is the full batch's (the loss is a mean over equal halves).
    torch_train(model, x[shard], y[shard], ddp=True)
    result = {"ddp": deltas(model)}
    # The undistributed runs, one per rank (each process has keras already).
    dtype = ("float64", "float32")[rank]
    model = build(dtype)
    torch_train(model, *(torch.tensor(a, dtype=getattr(torch, dtype)) for a in batch()))
    result[dtype] = float64_run(model) if dtype == "float64" else deltas(model)
    return result


def torch_recipe(path, rank):
    """docs/scaling.md's PyTorch recipe: its `train(rank, world_size)` in this rank.

    Only its `mp.spawn(...)` line does not run: spawning two more processes,
    each importing keras, would double the torch lane's time.
    """
    import contextlib
    import io
    import runpy
    import traceback

    stdout = io.StringIO()
    try:
        namespace = runpy.run_path(path, run_name="__recipe__")  # defines train()
        with contextlib.redirect_stdout(stdout):
            namespace["train"](rank, WORLD_SIZE)
    except Exception:
        return {
            "recipe_error": traceback.format_exc(),
            "recipe_stdout": stdout.getvalue(),
        }
    return {"recipe_error": None, "recipe_stdout": stdout.getvalue()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch(recipe=None):
    import torch.multiprocessing as mp

    port = free_port()
    recipe_port = free_port()
    while recipe_port == port:
        recipe_port = free_port()
    # The recipe's process group reads these (its own init_process_group).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(recipe_port))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=torch_rank, args=(r, port, queue, recipe))
        for r in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    stragglers = 0
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():  # done (its result is in) but stuck in its exit
            p.terminate()
            stragglers += 1
    out = {"devices": WORLD_SIZE, "stragglers": stragglers, **results[0]}
    out["float32"] = results[1]["float32"]
    out["ddp_rank1"] = results[1]["ddp"]
    if recipe:
        out["recipe_rank1_error"] = results[1]["recipe_error"]
    return out


RUNS = {"jax": run_jax, "tensorflow": run_tensorflow, "torch": run_torch}


def main(engine, recipe=None):
    os.environ["KERAS_BACKEND"] = engine
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if engine == "jax":
        # Before jax is imported: 8 virtual CPU devices, and real float64.
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_ENABLE_X64"] = "1"
    run = RUNS[engine]
    print(json.dumps(run(recipe) if recipe else run()))


if __name__ == "__main__":
    main(*sys.argv[1:])
