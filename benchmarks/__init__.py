"""Benchmark scripts on the library's parts; run them as modules from the repository root, e.g.
``python -m benchmarks.cifar10_knn --help``. Dated results with their machine: ``benchmarks/README.md``."""
