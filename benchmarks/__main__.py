"""`python -m benchmarks [name...]`: run the named benchmarks (default: all).

A name is a module under benchmarks/ with or without its "bench_" prefix.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = [str(Path(__file__).parent)]
    return sorted(m.name for m in pkgutil.iter_modules(here) if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    names = available()
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(names)}")
        return 2
    failed = 0
    for name in wanted:
        print(f"== {name}", flush=True)
        code = importlib.import_module(f"benchmarks.{name}").main()
        failed += bool(code)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
