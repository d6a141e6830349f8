"""Each public module imports on its own, in a fresh process, in any order.

`mhsa_core/__init__.py` registers the layer with Keras when keras is
imported; a module that imports keras while the layer module is half loaded
would make a circular import that a test process (keras already imported)
never sees. So each import runs in a new interpreter.
"""

import os
import subprocess
import sys

import keras
import pytest

# Backend-independent (each import runs in its own process): once, in the
# TensorFlow pass of `make test`.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent; runs in the tensorflow pass",
)
FRAMEWORKS = ("keras", "tensorflow", "torch", "jax")
IMPORTS = {
    "package": "import mhsa_core",
    "reference": "import mhsa_core.reference",
    "convert": "from mhsa_core import convert",
    "convert-botnet": "from mhsa_core.convert import from_timm, load_botnet_weights",
    "layers": "import mhsa_core.layers",
    "layer-position": "from mhsa_core.layers.position import ENCODINGS",
    "testing": "from mhsa_core.testing import assert_backends_agree",
    "cli": "from mhsa_core.consistency import cli",
    # The pytest plugin: every pytest run where mhsa-core is installed loads it.
    "pytest-plugin": "import mhsa_core.consistency.pytest_plugin",
    "distribution": "from mhsa_core.distribution import layout_rules; layout_rules()",
    # NumPy only: matplotlib (the plot extra) is imported by the plot function.
    "attention-maps": (
        "from mhsa_core.attention_maps import attention_maps; "
        "import sys; assert 'matplotlib' not in sys.modules"
    ),
    "layer-then-keras": (
        "import mhsa_core; import keras; mhsa_core.MultiHeadSelfAttention2D"
    ),
    # .keras loading finds the layer through Keras's registry: `import mhsa_core`
    # must fill it whichever of the two is imported first.
    "registered-keras-first": (
        "import keras, mhsa_core; "
        "assert keras.saving.get_registered_object("
        "'mhsa_core>MultiHeadSelfAttention2D')"
    ),
    "registered-keras-after": (
        "import mhsa_core, keras; "
        "assert keras.saving.get_registered_object("
        "'mhsa_core>MultiHeadSelfAttention2D')"
    ),
}
# These must not load a framework (the CLI's parent process, the oracle).
FRAMEWORK_FREE = (
    "package",
    "reference",
    "cli",
    "distribution",
    "attention-maps",
    "pytest-plugin",
)


def _run(code):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_imports_in_a_fresh_process(name):
    code = IMPORTS[name]
    if name in FRAMEWORK_FREE:
        code += (
            f"\nimport sys\nloaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]"
            "\nassert not loaded, loaded"
        )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
