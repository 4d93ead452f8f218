"""Where a benchmark's figures were taken: every bench prints this beside its numbers."""
from __future__ import annotations

import os
import platform
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, Python, cores and load at the start, plus the bench's own versions and devices."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        # These machines are shared: a high load explains a noisy figure.
        "load_average_at_start": os.getloadavg(),
        **extra,
    }
