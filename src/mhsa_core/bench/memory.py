"""Peak memory of a measurement: the growth of the process's peak resident set.

On Linux the peak (VmHWM in /proc/self/status) can be reset to the current
resident set by writing "5" to /proc/self/clear_refs (Linux >= 4.0), so the
growth is exactly peak-during-the-measurement minus resident-before. Elsewhere
(or where the reset is refused) it falls back to `resource.getrusage`'s
ru_maxrss, which cannot be reset: the growth is then a lower bound (a peak
reached earlier, e.g. by the framework's import, hides a smaller one), and
`exact` says so.

The resident set counts what the frameworks allocate on the CPU (XLA's and
torch's allocators included) and what a compile needs; it does not count
compile worker processes (torch.compile's).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
GB = 1e9


def _status_kb(field):
    """A `VmXxx:  123 kB` field of /proc/self/status, in bytes, or None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def _maxrss_bytes():
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        rss if sys.platform == "darwin" else rss * 1024
    )  # bytes on macOS, kB on Linux


class PeakMemory:
    """`start()` before building the measurement's inputs, `growth_gb()` after it."""

    def __init__(self):
        self.exact = False
        self._before = None

    def start(self):
        try:
            _CLEAR_REFS.write_text("5")
            self.exact = _status_kb("VmHWM") is not None
        except OSError:
            self.exact = False
        self._before = _status_kb("VmRSS") if self.exact else _maxrss_bytes()

    def peak_bytes(self):
        return _status_kb("VmHWM") if self.exact else _maxrss_bytes()

    def growth_gb(self) -> float:
        """Peak resident set since `start()` minus the resident set at `start()`,
        in GB (1e9)."""
        return max(0, self.peak_bytes() - self._before) / GB
