"""What the parent process and the backend workers agree on.

The parent (`runner`, `checks`) and each worker (`worker`) exchange only
files; this module names everything in them once, so that the writer and the
reader of a result cannot drift apart (an opt-in feature names its own tasks
and keys in its module, `features`, whose two halves are the writer and the
reader):

- the backends and what each can do (`BACKENDS`, `TRAINING_BACKENDS`,
  `case_backends`);
- the worker's tasks and phases;
- the files of a job directory and of a worker's output directory;
- the keys of the arrays in those files (`out_key(v)`, `weight_grad_key(v, j)`,
  ...), where `v` is an input variant of a case, `k` an input and `j` a
  trainable variable, in the order of `model.trainable_variables`;
- the optimizer settings of the optimizer-step task, which the worker builds
  and the step oracle (`oracles.step_oracle`) recomputes.

Imports nothing but the standard library (and `_subprocess`, which imports
nothing else).
"""

from mhsa_core._subprocess import BACKEND_MODULES

# ------------------------------------------------------------------ backends
BACKENDS = tuple(BACKEND_MODULES)  # tensorflow, torch, jax, numpy
# What a backend can do. Keras's numpy backend has no gradients, optimizers or
# jit: it loads and runs models (inference only), and in float32 only: its
# einsum/matmul compute float64 inputs in float32 (keras 3.15 result_type;
# canary "numpy-backend-float32" in tests/canaries).
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
# The matrix's own tasks (`tasks.TASKS`). The opt-in features' tasks are
# theirs (`features.tasks()`): a task not in ALL_TASKS runs only in the cases
# that ask for it.
ALL_TASKS = (FORWARD, FORWARD64, SCORES, GRADS, GRADS64, OPTIMIZERS, JIT, SAVE)
# Those of ALL_TASKS that a backend outside TRAINING_BACKENDS runs.
INFERENCE_TASKS = (FORWARD, SCORES)


def backend_tasks(backend, tasks, inference_tasks=INFERENCE_TASKS):
    """The subset of `tasks` that `backend` runs: all of them on a training
    backend, else those of `inference_tasks` (with the features':
    `features.inference_tasks()`)."""
    if backend in TRAINING_BACKENDS:
        return list(tasks)
    return [t for t in tasks if t in inference_tasks]


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


def work_file(i, name):
    """A file a task of case i writes in its worker's output directory
    besides its results (e.g. an exported artifact): "case{i}-{name}"."""
    return f"case{i}-{name}"


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
