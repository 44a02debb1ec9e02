"""Heads on a frozen encoder (installed as ``omnienc.adapters``).

Adapters import :mod:`omnienc` only, never :mod:`omnienc.pretext`: the exported encoder
checkpoint is the bridge between pretraining and reuse.
"""
