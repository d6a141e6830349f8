"""What the parent process and the backend workers agree on.

The parent (`runner`, `checks`) and each worker (`worker`) exchange only
files; this module names everything in them once, so that the writer and the
reader of a result cannot drift apart:

- the backends and what each can do (`BACKENDS`, `TRAINING_BACKENDS`,
  `case_backends`);
- the worker's tasks and phases;
- the files of a job directory and of a worker's output directory;
- the keys of the arrays in those files (`out_key(v)`, `weight_grad_key(v, j)`,
  ...), where `v` is an input variant of a case, `k` an input and `j` a
  trainable variable, in the order of `model.trainable_variables`;
- the optimizer settings of the optimizer-step task, which the worker builds
  and the step oracle (`oracles.step_oracle`) recomputes.

Imports nothing but the standard library.
"""

# ------------------------------------------------------------------ backends
BACKENDS = ("tensorflow", "torch", "jax", "numpy")
# What a backend can do. Keras's numpy backend has no gradients, optimizers or
# jit: it loads and runs models (inference only), and in float32 only: its
# einsum/matmul compute float64 inputs in float32 (keras 3.15 result_type).
TRAINING_BACKENDS = ("tensorflow", "torch", "jax")


def case_backends(case_dtype, backends):
    """The backends that can run a case of this dtype (numpy: not float64)."""
    if case_dtype == "float64":
        return [b for b in backends if b in TRAINING_BACKENDS]
    return list(backends)


# --------------------------------------------------------------------- tasks
FORWARD = "forward"  # the case's dtype; also AGAIN_KEY and the timing
FORWARD64 = "forward64"  # the same model cloned in float64
SCORES = "scores"  # attention scores (layer cases)
GRADS = "grads"
GRADS64 = "grads64"
OPTIMIZERS = "optimizers"  # one step of each of `OPTIMIZER_SETTINGS`
JIT = "jit"  # the forward pass compiled by the backend's compiler
SAVE = "save"  # a `.keras` file, loaded by the other backends in phase LOAD
# `model.export` in each format of the case's `exports`, each artifact run in
# its own runtime (`export`, `runtime`); opt-in: only cases with `exports`.
EXPORT = "export"
ALL_TASKS = (FORWARD, FORWARD64, SCORES, GRADS, GRADS64, OPTIMIZERS, JIT, SAVE)
LOCATE = "locate"  # every layer's output, in the case's dtype (`--locate`)
LOCATE64 = "locate64"  # every layer's output of the float64 clone (`--locate`)
LOCATE_TASKS = (LOCATE, LOCATE64)
DRIFT = "drift"  # K optimizer steps in the case's dtype and in float64 (`--steps`)
# Tasks a case runs only when asked (their options are in job.json): not in
# ALL_TASKS, so no case runs them by default.
OPT_IN_TASKS = (DRIFT, EXPORT, *LOCATE_TASKS)
KNOWN_TASKS = ALL_TASKS + OPT_IN_TASKS
# The tasks of a backend outside TRAINING_BACKENDS.
INFERENCE_TASKS = (FORWARD, SCORES, LOCATE)


def backend_tasks(backend, tasks):
    """The subset of `tasks` that `backend` runs."""
    if backend in TRAINING_BACKENDS:
        return list(tasks)
    return [t for t in tasks if t in INFERENCE_TASKS]


# A worker runs phase COMPUTE (every case's tasks), then phase LOAD (the
# `.keras` files the other backends saved).
COMPUTE = "compute"
LOAD = "load"
PHASES = (COMPUTE, LOAD)


def done_line(phase):
    """What a worker prints on stdout when it has finished `phase`."""
    return f"done {phase}"


# --------------------------------------------------------------------- files
JOB_FILE = "job.json"
STDERR_FILE = "stderr.txt"


def case_file(i):
    """Case i's inputs and weights (job directory), keys `job_input_key`,
    `job_weight_key`."""
    return f"case{i}.npz"


def result_file(i, task):
    """Case i's results of `task` (a worker's output directory)."""
    return f"case{i}-{task}.npz"


def model_file(i):
    """Case i's model, saved by task SAVE (a worker's output directory)."""
    return f"case{i}.keras"


def inputs_file(i):
    """The inputs a worker made for case i from its model's inputs (a model
    case given none), keys `job_input_key`: every worker makes the same ones
    (seeded NumPy), the parent reads them back for the report."""
    return f"case{i}-inputs.npz"


def load_file(saver, i):
    """Results of loading `model_file(i)` of the backend `saver` (phase LOAD)."""
    return f"load-{saver}-case{i}.npz"


def phase_file(phase):
    """Versions, timings and `errors[case][task]` of one phase."""
    return f"phase-{phase}.json"


FORWARD_SECONDS = "forward_seconds"  # timings[case]: best forward time, variant 0
# errors[case] keys besides the task names: building the case's model, and
# loading a file another backend saved.
SETUP_ERROR = "setup"


def load_error_key(saver):
    return f"{LOAD}:{saver}"


# ------------------------------------------------------------ job array keys
def job_input_key(v, name):
    """Input `name` ("x", "attention_mask", "input_0", ...) of variant v."""
    return f"input/{v}/{name}"


JOB_WEIGHT_PREFIX = "weight/"


def job_weight_key(name):
    """A weight of the canonical weight dict (layer cases)."""
    return f"{JOB_WEIGHT_PREFIX}{name}"


# --------------------------------------------------------- result array keys
def out_key(v):
    """The output of variant v (tasks FORWARD, FORWARD64, JIT, SCORES; loads)."""
    return f"out/{v}"


def output_key(v, o):
    """Output o of variant v of a multi-output model (`out_key(v)` for output 0,
    so that single-output models keep their one key)."""
    return out_key(v) if o == 0 else f"{out_key(v)}/{o}"


OUT_PREFIX = "out/"


# FORWARD: variant 0 run once more, to check that inference is repeatable.
AGAIN_KEY = "again/0"


def loss_key(v):
    return f"loss/{v}"


def input_grad_key(v, k):
    """Gradient of the loss of variant v with respect to its float input k."""
    return f"input/{v}/{k}"


def weight_grad_key(v, j):
    """Gradient of the loss of variant v with respect to trainable variable j."""
    return f"weight/{v}/{j}"


# The gradient keys of GRADS and GRADS64 (what the gradient checks compare).
GRADIENT_PREFIXES = ("input/", "weight/")
START_PREFIX = "start/"


def start_key(j):
    """Trainable variable j before any step (GRADS, GRADS64, OPTIMIZERS)."""
    return f"{START_PREFIX}{j}"


def step_grad_key(v, j):
    """OPTIMIZERS: the gradient of variable j that the steps of variant v used."""
    return f"grad/{v}/{j}"


def step_key(optimizer, v, j):
    """OPTIMIZERS: variable j after one step of `optimizer` with variant v's
    gradients, from `start_key(j)`."""
    return f"{optimizer}/{v}/{j}"


def export_key(fmt, v):
    """EXPORT: the output of variant v of the artifact of format `fmt`, run in
    that format's runtime."""
    return f"{fmt}/out/{v}"


def export_status_key(fmt):
    """EXPORT: a string array, what became of format `fmt` (`EXPORT_STATUSES`:
    "ok", or "n/a", "skipped", "failed" then ": " and the reason in one line)."""
    return f"{fmt}/status"


def export_note_key(fmt):
    """EXPORT: a string array, the scope of the check when it is less than one
    artifact run at every variant (e.g. one static export per size), else ""."""
    return f"{fmt}/note"


# The formats of `keras.Model.export` the matrix runs in their own runtimes.
EXPORT_FORMATS = ("tf_saved_model", "onnx", "openvino", "litert")
EXPORT_OK = "ok"
EXPORT_NA = "n/a"  # the exporter does not support this backend (any model)
EXPORT_SKIPPED = "skipped"  # a module it needs is not installed
EXPORT_FAILED = "failed"  # the export or the runtime raised
EXPORT_STATUSES = (EXPORT_OK, EXPORT_NA, EXPORT_SKIPPED, EXPORT_FAILED)


def saved_weight_key(j):
    """SAVE: `model.get_weights()[j]` of the saved model."""
    return f"weight/{j}"


IDENTICAL_PREFIX = "identical/"


def identical_key(j):
    """LOAD: 1 if loaded weight j is bit-identical to what the saver had."""
    return f"{IDENTICAL_PREFIX}{j}"


# A result's note for its cell (a 0-d str array), e.g. JIT when XLA could not
# compile the model and a tf.function graph ran instead.
NOTE_KEY = "note"


def variant_of(key):
    """The input variant of a per-variant result key, "{kind}/{v}/..." -> v."""
    return int(key.split("/")[1])


def keys_with(results, prefixes):
    """The keys starting with `prefixes` in any of `results` ({backend: result}),
    in natural order ("weight/0/10" after "weight/0/2")."""
    keys = {k for res in results.values() for k in res if k.startswith(prefixes)}
    return sorted(
        keys, key=lambda k: [int(p) if p.isdigit() else p for p in k.split("/")]
    )


def count_keys(result, prefix):
    """How many keys of one result start with `prefix`."""
    return sum(1 for k in result if k.startswith(prefix))


# ---------------------------------------------------------------- optimizers
# The optimizer-step task's settings: the worker builds
# `getattr(keras.optimizers, class_name)(**arguments)` and the step oracle
# applies the same formula with the same numbers in float64. Adam's are
# Keras's defaults, spelled out so that both sides read them from here.
SGD_LR = 0.01
ADAM_LR = 1e-3
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
# result-key prefix -> (keras.optimizers class name, its arguments)
OPTIMIZER_SETTINGS = {
    "sgd": ("SGD", {"learning_rate": SGD_LR}),
    "adam": (
        "Adam",
        {
            "learning_rate": ADAM_LR,
            "beta_1": ADAM_BETA_1,
            "beta_2": ADAM_BETA_2,
            "epsilon": ADAM_EPSILON,
        },
    ),
}


# ---------------------------------------------------------------- locate task
# LOCATE / LOCATE64: the outputs of every layer call of a model, in execution
# order (`locate.layer_outputs`); call i's output tensor t of variant v is
# `layer_out_key(v, i, t)`.
LAYER_NAMES_KEY = "layer_names"  # 1-D str array: call i's name
LAYER_CLASSES_KEY = "layer_classes"  # 1-D str array: call i's layer class
# A model that cannot be run layer by layer (e.g. a subclassed model), or a
# failure while doing it: the reason, as a 0-d str array (the locate tasks
# never raise: they are a diagnosis, not a check, and must not fail a run).
LOCATE_ERROR_KEY = "locate_error"
LAYER_OUT_PREFIX = "layer/"


def layer_out_key(v, i, t=0):
    """LOCATE / LOCATE64: output tensor t of layer call i, input variant v."""
    return f"{LAYER_OUT_PREFIX}{v}/{i}/{t}"


def layer_of(key):
    """The layer call of a `layer_out_key`, "layer/{v}/{i}/{t}" -> i."""
    return int(key.split("/")[2])


# -------------------------------------------------------------- drift task
# job.json "options" of task DRIFT: the number of optimizer steps, and the
# optimizer (a key of OPTIMIZER_SETTINGS).
DRIFT_STEPS = "drift_steps"
DRIFT_OPTIMIZER = "drift_optimizer"
DEFAULT_DRIFT_OPTIMIZER = "adam"
# The two training runs of task DRIFT: the model as it is (its dtype policy),
# and its float64 clone, from the same weights.
DRIFT_RUNS = ("train", "train64")
# Weights are kept at most at this many steps (a large model times many steps
# would not fit on disk); losses at every step.
DRIFT_MAX_RECORDED = 64


def drift_table_steps(steps):
    """The steps the drift table shows: 1, K/4, K/2 and K."""
    return sorted({1, max(1, steps // 4), max(1, steps // 2), steps})


def drift_recorded_steps(steps):
    """The steps after which task DRIFT keeps the weights: every step up to
    DRIFT_MAX_RECORDED steps, else that many evenly spaced, always with the
    table's steps."""
    if steps <= DRIFT_MAX_RECORDED:
        return list(range(1, steps + 1))
    spaced = {
        round(1 + i * (steps - 1) / (DRIFT_MAX_RECORDED - 1))
        for i in range(DRIFT_MAX_RECORDED)
    }
    return sorted(spaced | set(drift_table_steps(steps)))


def drift_loss_key(run, s):
    """DRIFT: the loss that step s (1..K) of `run` differentiated, i.e. at the
    weights after s - 1 steps (as `fit` logs a step's loss)."""
    return f"{run}/loss/{s}"


def drift_weight_key(run, s, j):
    """DRIFT: trainable variable j of `run` after s steps (s of
    `drift_recorded_steps`)."""
    return f"{run}/weight/{s}/{j}"
