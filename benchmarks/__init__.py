"""Benchmarks: one `bench_*.py` module per figure, each with `main()`.

Results are recorded in docs/benchmarks.md.
"""

import compileall
import contextlib
import os
import platform
import re
from pathlib import Path

import changeover

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    """Cores, CPU model and kernel, for the record next to every figure."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"


def compile_package() -> Path:
    """Compile changeover's modules into their __pycache__, as `pip install` does
    for an installed package (with PYTHONDONTWRITEBYTECODE=1, as on some
    machines, every run would compile them from source again); the package's
    source directory (a checkout's src/)."""
    here = Path(changeover.__file__).resolve().parent
    compileall.compile_dir(here, quiet=1)
    return here.parent


def write_section(heading: str, body: str) -> None:
    """Put `body` under `heading` ("## ...") in docs/benchmarks.md, in place of
    what was there, up to the next "## " heading."""
    text = (
        DOCS.read_text()
        if DOCS.exists()
        else "# Benchmarks\n\nFigures measured by `make bench` (`python -m benchmarks`).\n"
    )
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
