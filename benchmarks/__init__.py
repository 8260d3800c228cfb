"""Benchmarks: one `bench_*.py` module per figure, each with `main()`.

Results are recorded in docs/benchmarks.md.
"""
