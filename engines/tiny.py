"""Tiny random checkpoints in the REAL on-disk formats, loaded by exactly the code that loads real ones.

As diffusers' `get_dummy_components` and transformers' tiny test configs do, each writer builds a
small random model and saves it the way the public checkpoint is saved, so tests and the `tiny`
profile go through the real loading path offline. Writers are idempotent: an existing directory is reused.
"""
from __future__ import annotations
