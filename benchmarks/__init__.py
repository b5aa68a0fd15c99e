"""Reproducible benchmarks of keras_sam: ``python -m benchmarks.speed`` and
``python -m benchmarks.generalization`` (both accept ``--quick``). Results live in
``docs/benchmarks/``."""
