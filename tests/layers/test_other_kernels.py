"""The other-kernels lane is really another machine: under the settings of
tests/kernels.py this backend computes other bits than it does natively.

The lane (`make test`) reruns the `machine_sensitive` tests under each
setting; if no setting moved this backend's kernels, those reruns would prove
nothing. Here one subprocess per setting computes the 0.1.0 compat outputs
and they are compared bit for bit with this (native) process's: at least one
setting must change some output's bits. That is also why the old compat test,
which compared outputs bit for bit with numbers from another machine, fails
under the lane while the budget rule of test_compat.py passes there.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kernels

BACKEND = keras.backend.backend()
SCRIPT = kernels.__file__

pytestmark = [
    pytest.mark.slow,  # a process per setting
    pytest.mark.skipif(
        bool(os.environ.get(kernels.ACTIVE)),
        reason="compares forced kernels with this process's: the native lane only",
    ),
]


def _outputs_under(setting, tmp_path):
    out = tmp_path / f"{setting}.npz"
    env = kernels.environment(setting)
    env["KERAS_BACKEND"] = BACKEND
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--outputs", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_some_setting_moves_this_backends_bits(tmp_path):
    native = kernels.compat_outputs()
    moved = {}
    for setting in kernels.SETTINGS:
        forced = _outputs_under(setting, tmp_path)
        assert sorted(forced) == sorted(native)
        moved[setting] = {
            k: float(np.max(np.abs(forced[k].astype(np.float64) - v)))
            for k, v in native.items()
            if not np.array_equal(forced[k], v)
        }
    assert any(moved.values()), (
        f"no setting of tests/kernels.py changed a bit of {BACKEND}'s outputs: the "
        f"other-kernels lane runs the native kernels here; measure new knobs with "
        f"tools/kernel_paths.py"
    )
    # Whether the moved outputs are still right is test_compat.py's verdict,
    # under the lane, by the budget rule.
