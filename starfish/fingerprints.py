"""Which config fields decide a result: the ones that enter the fingerprints and cache keys of
the pipeline's steps (tasks/pipeline.py), their outputs (steps.py) and the bench's cells."""

from __future__ import annotations

from typing import Any, Mapping

# How a step runs, not what it computes: left out of the fingerprints and cache keys of results,
# so setting one (or adding one to the config) never invalidates a result. `solve_dtype` is one:
# a float32 solve is redone in float64 unless its residual is within the bound both meet.
EXECUTION_FIELDS = {"data": {"num_workers"},
                    "heal": {"cache", "solve_memory_mb", "solve_dtype", "grad_checkpointing", "compile"}}
# Values that reproduce what results were before their field existed: left out too, so older
# fingerprints stay valid. An empty `model.kwargs` is the model as it was; BatchNorm was frozen and
# the least-squares solve exact before `heal.batchnorm` and `heal.solver`; `precision` `fp32`,
# and `auto` on a CPU, compute what every result before the field did (the device, as with
# `model.device=auto`, is not part of a fingerprint); `evaluate.split=test` is the split every earlier result used.
NEUTRAL_VALUES = {("model", "kwargs"): ({},), ("heal", "precision"): ("auto", "fp32"),
                  ("heal", "batchnorm"): ("frozen",), ("heal", "solver"): ("exact",),
                  ("evaluate", "precision"): ("auto", "fp32"), ("evaluate", "split"): ("test",),
                  ("prune", "scope"): ("default",), ("heal", "quant"): ("none",),
                  ("prune", "allocation"): ("uniform",), ("prune", "depth"): (0,),
                  ("heal", "statistics_images"): (None,)}


def result_fields(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A config section's fields that decide its results: no execution fields, no neutral values."""
    return {key: value for key, value in values.items() if key not in EXECUTION_FIELDS.get(section, ())
            and value not in NEUTRAL_VALUES.get((section, key), ())}
