"""Benchmarks of this implementation against transformers' native port; see `bench/run.py`."""
