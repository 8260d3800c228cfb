"""Benchmarks: one `bench_*.py` module per figure, each with `main()`.

Results are recorded in docs/benchmarks.md.
"""

import contextlib
import os
import platform
from pathlib import Path


def machine() -> str:
    """Cores, CPU model and kernel, for the record next to every figure."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"
