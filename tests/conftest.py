"""Test session set-up. One pytest process runs one Keras backend (KERAS_BACKEND)."""

import os
import tempfile

# Before keras (and so jax) is imported: the float64 oracle comparisons need
# real float64 on JAX, which otherwise silently computes in float32. float32
# tests are unaffected: every array they feed is float32 and Keras casts
# explicitly.
if os.environ.get("KERAS_BACKEND") == "jax":
    os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Hypothesis keeps a cache in the working directory even with database=None:
# keep it out of the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    os.path.join(tempfile.gettempdir(), "mhsa-core-hypothesis"),
)

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from the default dtype policy and a fresh name scope."""
    keras.config.set_dtype_policy("float32")
    # free_memory=False: no gc.collect() per test. With a framework loaded it
    # took ~0.7 s per test on this machine, most of the suite's time; Python's
    # own collector still runs.
    keras.utils.clear_session(free_memory=False)
    yield
    keras.config.set_dtype_policy("float32")


# The cross-backend tests' one rule for the `slow` marker: a test that uses a
# fixture which runs the matrix or the bench in worker processes (seconds to
# minutes, once per module) is slow, so `make test-fast` never starts those
# workers. (Tests that start workers themselves carry the marker.)
WORKER_FIXTURES = {
    "report",
    "built_in_report",
    "tiny_run",
    "torch_alone",
    "dict_model_run",
    "tally",
    "jax_bug_run",
}


@pytest.fixture(scope="session")
def built_in_report():
    """The one matrix run of the built-in cases that tests/consistency's
    test_matrix and test_export_cases judge (`built_in_run`: every case,
    every task, every backend; some cases exported too)."""
    import built_in_run  # tests/consistency: only its tests ask for this

    return built_in_run.run()


def pytest_collection_modifyitems(items):
    for item in items:
        if WORKER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
