"""Benchmarks for runway-gateway: `.venv/bin/python -m bench` or `.venv/bin/python bench/run.py`
(docs/benchmarks.md)."""
