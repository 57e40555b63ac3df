"""The pipeline's Prefect tasks: thin wrappers over `starfish.steps` and `starfish.tracking`.

Tasks take and return small dicts of paths, content hashes and numbers ("refs"), never modules
or tensors. Each is cached by what its result depends on (see `step_key`): its config
sections, the dense checkpoint's bytes and its input refs, never the run id. Results are
persisted, so a new run with the same inputs and data skips finished steps and a failed run
resumes where it stopped. Outputs go to a folder named by that key, so a cached result always
points at files with the content it describes. Transient errors are retried with backoff;
`StarfishError` (bad config or input, a failed check) is deterministic and is not.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

from prefect import State, Task, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from starfish import gate, steps, tracking
from starfish.config import PipelineConfig, from_dict
from starfish.errors import StarfishError
from starfish.fingerprints import result_fields
from starfish.io import canonical_json, sha256_bytes, sha256_file
from tasks import dvc
from tasks.results import PlainJSON, PlainJSONKeyStorage

Ref = dict[str, Any]
ALL_SECTIONS = tuple(field.name for field in fields(PipelineConfig))
# What each step's output depends on, besides its input refs.
STEP_SECTIONS = {
    "sample_calibration": ("data", "calibration"),
    "prune": ("data", "model", "prune"),
    "heal": ("data", "model", "heal"),
    "quantize": ("data", "model", "quant"),
    "evaluate": ("data", "model", "prune", "evaluate"),
    "register": ALL_SECTIONS,
}
# Facts about how a step ran, not what it made (its timings: `heal_seconds`, `warm_start_seconds`,
# `cache_seconds`, ...): left out of the keys of the steps after it, so a rebuilt output with the
# same bytes lets them stay cached.
RUN_FACT_SUFFIX = "_seconds"
# Parameters that say where a step's record goes, not what it computes: left out of its key.
UNKEYED = ("config", "mlflow_run_id")


def step_key(step: str, params: Mapping[str, Any]) -> str:
    """Content key of one step's result: its config sections, dense checkpoint bytes and other inputs."""
    config = params["config"]
    sections = STEP_SECTIONS[step]
    checkpoint = config["model"]["checkpoint"]
    dense = sha256_file(checkpoint) if "model" in sections and checkpoint and Path(checkpoint).is_file() else None
    inputs = {name: {k: v for k, v in value.items() if not k.endswith(RUN_FACT_SUFFIX)} if isinstance(value, dict)
              else value
              for name, value in params.items() if name not in UNKEYED}
    payload = {"step": step, "config": {name: result_fields(name, config[name]) for name in sections},
               "dense_sha256": dense,
               "inputs": inputs}
    return sha256_bytes(canonical_json(payload))


def output_dir(step: str, **params: Any) -> Path:
    """`<workdir>/<step>-<key>`: where a step with these inputs writes, so equal inputs share outputs."""
    return Path(params["workdir"]) / f"{step}-{step_key(step, params)[:16]}"


def retry_unless_deterministic(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (I/O, network, resources); never a StarfishError."""
    return not isinstance(state.result(raise_on_failure=False), StarfishError)


def pipeline_task(step: str) -> Callable:
    """The shared task settings: retries with backoff, content-keyed cache, results persisted as
    plain JSON (never pickle)."""
    return task(name=step, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                retry_jitter_factor=0.2, retry_condition_fn=retry_unless_deterministic,
                cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda _, params: step_key(step, params)).configure(
                    key_storage=PlainJSONKeyStorage()),
                persist_result=True, result_serializer=PlainJSON())


def _checked(ref: Ref) -> str:
    """The ref's path, after checking the file still has the content the ref was made with."""
    path = Path(ref["path"])
    if not path.is_file():
        raise StarfishError(f"{path} is gone; run again with PREFECT_TASKS_REFRESH_CACHE=true to rebuild it")
    if sha256_file(path) != ref["sha256"]:
        raise StarfishError(f"{path} changed since it was made (sha256 differs); restore it (`dvc checkout`) "
                            "or run again with PREFECT_TASKS_REFRESH_CACHE=true")
    return str(path)


@pipeline_task("sample_calibration")
def sample_calibration(config: dict[str, Any], out: str) -> Ref:
    """The calibration split at `out`: by its DVC stage when one produces `out`, else sampled here."""
    cfg = from_dict(config)
    stage = dvc.producing_stage(out)
    if stage is None:
        result = steps.sample(cfg, out)
    else:
        dvc.reproduce(*stage)
        result = steps.split_info(out)
        wanted = {"dataset": cfg.data.kind, "fraction": cfg.calibration.fraction, "seed": cfg.calibration.seed}
        found = {key: result[key] for key in wanted}
        if found != wanted:
            raise StarfishError(f"DVC stage {stage[1]!r} made {out} with {found}, but this run asks for {wanted}; "
                                "set data/calibration in the params file the stage reads, not as overrides")
    return {**result, "md5": dvc.file_md5(out)}


@pipeline_task("prune")
def prune(config: dict[str, Any], calibration: Ref, workdir: str) -> Ref:
    """Prune the dense model; the checkpoint carries the masks."""
    out = output_dir("prune", config=config, calibration=calibration, workdir=workdir)
    return steps.prune_step(from_dict(config), _checked(calibration), out / "pruned.safetensors")


@pipeline_task("heal")
def heal(config: dict[str, Any], pruned: Ref, calibration: Ref, workdir: str) -> Ref:
    """Heal the pruned checkpoint on the calibration split (writes the loss curve beside it)."""
    out = output_dir("heal", config=config, pruned=pruned, calibration=calibration, workdir=workdir)
    return steps.heal_step(from_dict(config), _checked(pruned), _checked(calibration), out / "healed.safetensors")


@pipeline_task("quantize")
def quantize(config: dict[str, Any], healed: Ref, calibration: Ref, workdir: str) -> Ref:
    """The model as it is served: ONNX, int8 by quant.mode (static ranges from the calibration split)."""
    out = output_dir("quantize", config=config, healed=healed, calibration=calibration, workdir=workdir)
    return steps.quantize_step(from_dict(config), _checked(healed), _checked(calibration), out / "served.onnx")


@pipeline_task("evaluate")
def evaluate(config: dict[str, Any], pruned: Ref, healed: Ref, served: Ref, workdir: str) -> Ref:
    """Top-1 of dense, pruned, healed and the served model (in onnxruntime), recovery (the served
    model's) and measured sparsity, as metrics.json."""
    out = output_dir("evaluate", config=config, pruned=pruned, healed=healed, served=served,
                     workdir=workdir) / "metrics.json"
    metrics = steps.evaluate_step(from_dict(config), _checked(pruned), _checked(healed), out, _checked(served))
    return {**metrics, "path": str(out), "sha256": sha256_file(out)}


@pipeline_task("register")
def register(config: dict[str, Any], calibration: Ref, pruned: Ref, healed: Ref, served: Ref, evaluation: Ref,
             model_name: str, tracking_uri: str, workdir: str, mlflow_run_id: str | None = None) -> Ref:
    """Log the run to MLflow and register the model as `challenger`, if it passed every check:
    into `mlflow_run_id` (the compress flow's run), or a run of its own (a sweep's point)."""
    params = dict(config=config, calibration=calibration, pruned=pruned, healed=healed, served=served,
                  evaluation=evaluation, model_name=model_name, tracking_uri=tracking_uri, workdir=workdir)
    out = output_dir("register", **params)
    for ref in (calibration, pruned, healed, served, evaluation):
        _checked(ref)
    cfg = from_dict(config)
    gate.check_registrable(evaluation, cfg.gate)  # before loading and exporting a model that stays out
    with steps.registration_inputs(cfg, calibration["path"], healed, served) as recorded:
        return tracking.log_compress_run(cfg, calibration=calibration, healed=healed, evaluation=evaluation,
                                         model_name=model_name, uri=tracking_uri, report_dir=out,
                                         register_key=step_key("register", params), flow_run_id=flow_run.id,
                                         started_at=flow_start(), run_id=mlflow_run_id, **recorded)


def flow_start() -> float | None:
    """When the flow run this task belongs to started (epoch seconds), or None outside one."""
    context = FlowRunContext.get()
    start = context.flow_run.start_time if context and context.flow_run else None
    return start.timestamp() if start else None


@task(name="promote_version", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_unless_deterministic, cache_policy=NO_CACHE)
def promote_version(model_name: str, gate: dict[str, Any], tracking_uri: str, version: str | None = None) -> Ref:
    """Move `champion` to a version if it passes the gate; never cached, the registry changes."""
    return tracking.promote(model_name, from_dict({"gate": gate}).gate, tracking_uri, version)
