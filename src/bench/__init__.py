"""Benchmarks that print figures (``python -m src.bench ...``) and the GPU check."""
