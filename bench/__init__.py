"""Benchmarks for runway-gateway: `python -m bench` or `python bench/run.py` (docs/benchmarks.md)."""
