"""Benchmarks (bench/README.md); run each as `python -m bench.NAME` from the repository root."""
