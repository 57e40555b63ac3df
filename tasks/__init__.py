"""Prefect tasks over the starfish pipeline steps (see `tasks.pipeline`)."""

from tasks.pipeline import evaluate, heal, promote_version, prune, quantize, register, sample_calibration

__all__ = ["evaluate", "heal", "promote_version", "prune", "quantize", "register", "sample_calibration"]
