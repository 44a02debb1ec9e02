"""Measured runs that assemble omnienc's parts (installed as ``omnienc.benchmarks``).

Run them as modules, e.g. ``python -m omnienc.benchmarks.encoders``; each writes its table to
``benchmarks/results/`` with the exact command that produced it.
"""
