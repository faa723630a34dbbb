"""Benchmarks and the scripts that made the bundled models and results (see tools/RESULTS.md).

Run them as modules from the repository root, e.g. ``python -m tools.bench_e2e --smoke``; data
paths come from :mod:`tools.datasets`. ``make bench-smoke`` runs every tool on the bundled sample.
"""
