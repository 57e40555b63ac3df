"""MLflow tracking and the gated model registry: the only module that imports MLflow.

A compress run is recorded once, after every check passed: params, metrics, tags that pin it to
its code and data (git commit, calibration-split hash, DVC md5), the calibration split as a
dataset input, the masks, a report with the healing loss plot, and the healed model. The model
version gets the alias `challenger`; `promote` moves `champion` only through the gate.

Where it goes: `MLFLOW_TRACKING_URI` when set, else the embedded `sqlite:///mlflow.db`. An
`mlflow server --artifacts-destination s3://...` in front of S3 (with `MLFLOW_S3_ENDPOINT_URL`
and the AWS variables set for the server) sends the artifacts to S3 through boto3.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from starfish.config import GateConfig, PipelineConfig
from starfish.errors import StarfishError
from starfish.gate import (
    METRICS,
    MODEL_NAME_TAG,
    REGISTER_KEY_TAG,
    SERVED_METRICS,
    SERVED_SHA256_TAG,
    check_registrable,
    promotion_failures,
)
from starfish.io import process_alive, read_json, sha256_file
from starfish.pruning.masks import Masks
from starfish.report import model_card, write_report

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
DEFAULT_TRACKING_URI = SQLITE + "mlflow.db"
EXPERIMENT = "starfish"
CHALLENGER = "challenger"
CHAMPION = "champion"
SPLIT_HASH_TAG = "starfish.calibration_split_hash"  # on the run: the calibration split it was healed on
ERROR_TAG = "starfish.error"  # on a flow's run: the line its failure printed
STEP_TAG = "starfish.step."  # + a step's name, on a flow's run: its final state (Completed, Cached, ...)
VERSION_TAG = "starfish.version"  # on a flow's run: the version it registered or reused (name/version)
MODEL_ARTIFACT = "model"
_PACKAGES = ("torch", "timm", "safetensors", "numpy", "onnxruntime")
LOCK_SUFFIX = ".lock"  # the registry lock of model M is the registered model M.lock (`registry_lock`)
LOCK_TIMEOUT_S = 900.0
LOCK_STALE_S = 1800.0  # longer than any registration holds it
LOCK_POLL_S = 0.5
_HELD_TOKENS: set[str] = set()  # the registry locks this process holds now
# log_model of a model from code runs that code to validate it, and sets process-wide state: one at a time.
_LOG_LOCK = threading.Lock()


def tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI in force: the argument, else `MLFLOW_TRACKING_URI`, else embedded sqlite.

    A relative sqlite path is made absolute, so the URI means the same store from any folder.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        uri = SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


# MLflow retries an unreachable server for minutes by default; a run that has already done its
# compute should fail in seconds instead. A value set in the environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def preflight(uri: str, timeout: float = 10.0) -> None:
    """Check, before any compute, that the tracking store can be reached and written, and bound
    MLflow's HTTP retries (HTTP_DEFAULTS) so a server that dies later fails the run quickly."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StarfishError(f"MLflow tracking server {uri} cannot be reached ({reason}); start it, or point "
                                "--tracking-uri / MLFLOW_TRACKING_URI at one that runs") from None
    elif uri.startswith(SQLITE):
        folder = Path(uri[len(SQLITE):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StarfishError(f"MLflow store {uri}: {folder} is not a writable folder; create it or choose "
                                "another --tracking-uri")
        client_for(uri)


def client_for(uri: str) -> Any:
    """An MlflowClient on `uri`. A sqlite store is opened first under a file lock beside it: MLflow
    creates and migrates its tables on first open, and two processes doing that at once leave the
    database broken (`table _alembic_tmp_metrics already exists`)."""
    from mlflow import MlflowClient

    if not uri.startswith(SQLITE):
        return MlflowClient(uri)
    with open(uri[len(SQLITE):] + ".starfish-open.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(uri)  # opens the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's, in the same file
    return client


def registered_model_name(cfg: PipelineConfig) -> str:
    """One registry entry per base model: every compressed variant of it is a version there."""
    return "starfish-" + cfg.model.name.replace("_", "-")


def git_commit(cwd: str | Path = ".") -> tuple[str, bool] | None:
    """(HEAD's sha, whether tracked files differ from it); None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha, bool(dirty)


def _pip_requirements() -> list[str]:
    """Pinned from what is installed, so log_model skips its slow dependency inference."""
    pins = []
    for package in _PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def use_experiment(uri: str) -> str:
    """EXPERIMENT's id, created if needed; an embedded sqlite store keeps its artifacts beside its
    database. Runs are made in it by id: `mlflow.set_experiment` would export MLFLOW_EXPERIMENT_ID
    to every process this one starts, and a child on another store then fails to start a run
    ("No Experiment with id=1 exists")."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = (Path(uri[len(SQLITE):]).parent / "mlartifacts").as_uri() if uri.startswith(SQLITE) else None
        try:
            return mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException as exc:  # two flows starting at once: the other one created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = mlflow.MlflowClient().get_experiment_by_name(EXPERIMENT)
    return experiment.experiment_id


@contextlib.contextmanager
def registry_lock(client: Any, model_name: str, timeout: float = LOCK_TIMEOUT_S,
                  stale_after: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the registry lock of `model_name` for the body: registration and promotion of one
    model are check-then-write sequences, so two flows on one store take turns.

    The lock is a registered model named `<model_name>.lock`: the store creates a name once, on
    any backend (file, sqlite, a tracking server over SQL), so creating it is the atomic
    test-and-set. Its tags name the holder. A holder that died leaves it behind: one on this host
    whose process is gone (or this process, after a failed release) is broken at once, one
    elsewhere after `stale_after` seconds."""
    from mlflow.exceptions import MlflowException

    lock, token = model_name + LOCK_SUFFIX, uuid.uuid4().hex
    holder = {"starfish.lock.host": socket.gethostname(), "starfish.lock.pid": str(os.getpid()),
              "starfish.lock.token": token}
    deadline, waited = time.monotonic() + timeout, False
    while True:
        try:
            client.create_registered_model(lock, tags=holder, description="held while a registration or promotion "
                                                                          "of the model runs; not a model")
            break
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # held as the store tried, released as it looked
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:  # released meanwhile
            continue
        age = time.time() - held.creation_timestamp / 1000
        if _holder_dead(held.tags or {}) or age > stale_after:
            log.warning("breaking the registry lock %s: its holder %s (pid %s) is gone", lock,
                        (held.tags or {}).get("starfish.lock.host"), (held.tags or {}).get("starfish.lock.pid"))
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise StarfishError(f"the registry lock {lock} has been held for over {timeout:.0f} s by another "
                                "registration or promotion; retry when it ends, or delete that registered model "
                                "if its holder is dead")
        if not waited:
            log.info("waiting for the registry lock %s (another registration or promotion of %s)", lock, model_name)
            waited = True
        time.sleep(LOCK_POLL_S)
    _HELD_TOKENS.add(token)
    try:
        yield
    finally:
        _HELD_TOKENS.discard(token)
        try:
            client.delete_registered_model(lock)
        except Exception as exc:  # a store gone down: the next holder breaks it as this process's own
            log.warning("could not release the registry lock %s (%s)", lock, exc)


def _holder_dead(tags: dict[str, str]) -> bool:
    """Whether the lock's holder is a process of this host that no longer holds it."""
    if tags.get("starfish.lock.host") != socket.gethostname():
        return False
    pid = tags.get("starfish.lock.pid", "")
    if not pid.isdigit() or int(pid) == 0:  # no process named: nothing can hold it
        return True
    if int(pid) == os.getpid():
        return tags.get("starfish.lock.token") not in _HELD_TOKENS
    return not process_alive(int(pid))


def _earlier_attempt(client: Any, experiment_id: str, model_name: str, key: str, current: str | None) -> Any:
    """The version an earlier attempt with this registration key left complete, or None.

    Called under `registry_lock`, so no other attempt is registering now: one whose run is not
    FINISHED (or that left no version) died part-way. Every version it registered is removed, so
    a retry leaves exactly one version. Its run stays as the record of what happened: no longer
    an attempt (the key tag removed) and FAILED, unless it is `current`, the run retrying now."""
    complete = None
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{REGISTER_KEY_TAG}` = '{key}'"):
        versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        if complete is None and run.info.status == "FINISHED" and versions:
            complete = versions[0]
            continue
        for stale in versions:
            client.delete_model_version(stale.name, stale.version)
        if run.info.run_id != current:
            client.delete_tag(run.info.run_id, REGISTER_KEY_TAG)
            client.set_tag(run.info.run_id, ERROR_TAG, "its registration died part-way; a later attempt removed "
                                                       f"its {len(versions)} version(s)")
            client.set_terminated(run.info.run_id, "FAILED")
        log.warning("removed the unfinished registration attempt %s (%d version(s))", run.info.run_id, len(versions))
    return complete


def _test_dataset(cfg: PipelineConfig, metrics: dict[str, Any]) -> Any:
    """The evaluation split as an MLflow dataset input: which images recovery was measured on."""
    import mlflow
    import pandas as pd

    images = int(metrics.get("test_images", 0))
    identity = f"{cfg.data.kind}|{Path(cfg.data.root).resolve()}|{cfg.evaluate.split}|{images}"
    with warnings.catch_warnings():  # a local source: MLflow warns about its path form
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(pd.DataFrame({"index": range(images)}), source=str(Path(cfg.data.root)),
                                       name=f"{cfg.data.kind}-{cfg.evaluate.split}",
                                       digest=hashlib.sha256(identity.encode()).hexdigest()[:32])


def version_tags(cfg: PipelineConfig, healed: str | Path) -> dict[str, str]:
    """How a version was made, as tags the registry can be searched by
    (`tags.pruner = 'wanda' and tags.structure = 'neurons+heads'`)."""
    from starfish.formats.checkpoint import checkpoint_metadata

    return {"pruner": cfg.prune.method, "structure": cfg.prune.structure, "sparsity": f"{cfg.prune.sparsity:g}",
            "healer": cfg.heal.method, "preset": cfg.heal.preset,
            "dense_state_sha256": str(checkpoint_metadata(healed).get("dense_state_sha256", "unknown"))}


def _create_run(client: Any, experiment_id: str, cfg: PipelineConfig, started_at: float | None,
                tags: dict[str, str] | None = None) -> str:
    """A new run named after what it compresses, started at `started_at` (epoch seconds; now if
    None), so its duration is the whole compression; its id."""
    healer = cfg.heal.method if cfg.heal.preset == "default" else f"{cfg.heal.method}-{cfg.heal.preset}"
    return client.create_run(experiment_id, start_time=int(started_at * 1000) if started_at else None, tags=tags,
                             run_name=f"{cfg.model.name}-{cfg.prune.method}{cfg.prune.sparsity:g}-{healer}").info.run_id


def _config_params(cfg: PipelineConfig) -> dict[str, Any]:
    """Every config field as a run param: `heal.steps`, `prune.sparsity`, ..."""
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items() for key, value in fields.items()}


def _source_tags(cfg: PipelineConfig, flow_run_id: str | None) -> dict[str, str]:
    """Where a run came from: the commit (a hash; whether tracked files differed is its own tag),
    the model, the Prefect flow run."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit[0] if commit else "unknown",
            "starfish.git_dirty": str(commit[1]).lower() if commit else "unknown",
            MODEL_NAME_TAG: cfg.model.name, "prefect.flow_run_id": flow_run_id or "none"}


def _system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's sampler of this process's machine (CPU, memory, disk, GPUs it sees) into the run,
    started; None where it is switched off (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false)."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() == "false":
        return None
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
                                   tracking_uri=uri)
    monitor.start()
    return monitor


@contextlib.contextmanager
def flow_run(cfg: PipelineConfig, uri: str, flow_run_id: str | None = None,
             started_at: float | None = None) -> Iterator[str]:
    """One MLflow run spanning a compress flow run (its id is yielded): opened when the flow
    starts (`started_at`, epoch seconds), with its config as params and system metrics sampled
    while it lasts. Its registration ends it FINISHED (`log_compress_run(run_id=...)`); a flow that
    fails before that ends it FAILED, with the error's line as a tag. A failure after it (in
    promotion) is tagged and leaves it FINISHED, so its version stays promotable."""
    import mlflow
    from mlflow.entities import Param, RunTag

    from starfish.errors import error_line

    mlflow.set_tracking_uri(uri)
    client = client_for(uri)
    run_id = _create_run(client, use_experiment(uri), cfg, started_at, tags=_source_tags(cfg, flow_run_id))
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in _config_params(cfg).items()])
    log.info("MLflow run %s opened for this flow run", run_id)
    monitor = _system_metrics(run_id, uri)
    try:
        try:
            yield run_id
        finally:
            if monitor is not None:
                monitor.finish()
    except BaseException as exc:
        line = (error_line(exc) or f"{type(exc).__name__}: {exc}").removeprefix("starfish: error: ")
        with contextlib.suppress(Exception):  # the store itself may be what failed
            client.log_batch(run_id, tags=[RunTag(ERROR_TAG, line[:4000])])
            if client.get_run(run_id).info.status != "FINISHED":
                client.set_terminated(run_id, "FAILED")
        raise
    if client.get_run(run_id).info.status != "FINISHED":  # it reused an earlier registration
        client.set_terminated(run_id, "FINISHED")


def note_on_run(uri: str, run_id: str, tags: dict[str, str] | None = None,
                metrics: dict[str, float] | None = None) -> None:
    """Add tags and metrics to a flow's run as it goes (step states, the evaluation before the
    gate, the version). A record, not a result: a store that fails here is a warning and the
    flow goes on, since the register task (which retries) writes what the version needs."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    try:
        client_for(uri).log_batch(run_id, tags=[RunTag(key, value) for key, value in (tags or {}).items()],
                                  metrics=[Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()])
    except Exception as exc:
        log.warning("could not record %s on MLflow run %s (%s); the flow goes on",
                    sorted({**(tags or {}), **(metrics or {})}), run_id, str(exc).splitlines()[0] if str(exc) else exc)


def log_served_model(path: str | Path, fmt: str, example: np.ndarray, signature: Any, model_name: str) -> Any:
    """Log the exported file (`fmt`: bitmask or onnx) behind the serving pyfunc into the active
    run, registered as a new version of `model_name`, tagged with the file's sha256 (which
    `starfish serve` checks the file it loads against); MLflow's ModelInfo. What `mlflow models
    serve` and `mlflow.pyfunc.load_model` of the version then run is `starfish/serving.py`."""
    import mlflow

    from starfish import serving
    from starfish.serving import CHECKPOINT, ONNX

    digest = sha256_file(path)
    with _LOG_LOCK:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(Path(serving.__file__)),
            artifacts={ONNX if fmt == "onnx" else CHECKPOINT: str(path)},
            input_example=example, signature=signature, pip_requirements=_pip_requirements(),
            code_paths=[str(Path(serving.__file__).parent)],  # starfish itself travels with the model
            registered_model_name=model_name)
    mlflow.MlflowClient().set_model_version_tag(model_name, info.registered_model_version, SERVED_SHA256_TAG, digest)
    return info


def log_compress_run(cfg: PipelineConfig, *, calibration: dict[str, Any], healed: dict[str, Any],
                     evaluation: dict[str, Any], model: torch.nn.Module, masks: Masks, example: np.ndarray,
                     curve: list[dict[str, Any]], export: dict[str, Any], model_name: str, uri: str,
                     report_dir: str | Path, register_key: str, flow_run_id: str | None = None,
                     started_at: float | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Record one compressed model and register it as a version with alias `challenger`.

    What is recorded comes in loaded: the healed `model` (on the CPU) and its `masks`, an input
    `example`, the heal loss `curve`, and `export`, the compressed checkpoint that is registered
    (`steps.export_step`'s result: its path and sizes); `healed` is the heal step's result.
    The gate is checked first, so a model that failed a check is never registered.
    `register_key` names this registration: a retry finds a complete earlier attempt and reuses
    it, or removes an unfinished one first. It records into `run_id` (a flow's run, `flow_run`)
    or a run of its own that starts at `started_at` (epoch seconds; the flow run's start). The
    version's tags and the alias are set inside the run, so a run is FINISHED only when all of it
    was written.
    """
    import mlflow
    import pandas as pd
    from mlflow.entities import RunTag
    from mlflow.models import infer_signature
    from safetensors.torch import save_file

    metrics = read_json(evaluation["path"])
    check_registrable(metrics, cfg.gate)
    report, plot = write_report(report_dir, cfg, metrics, calibration, healed, curve)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())

    mlflow.set_tracking_uri(uri)
    client = client_for(uri)
    with registry_lock(client, model_name):  # the check for an earlier attempt, then the registration
        experiment_id = use_experiment(uri)
        earlier = _earlier_attempt(client, experiment_id, model_name, register_key, run_id)
        if earlier is not None:
            client.set_registered_model_alias(model_name, CHALLENGER, earlier.version)
            log.info("%s version %s was registered by an earlier attempt; reused", model_name, earlier.version)
            return {"run_id": earlier.run_id, "model_uri": earlier.source, "model_name": model_name,
                    "version": str(earlier.version), "report": str(report), "plot": str(plot), "tracking_uri": uri,
                    "recovery": metrics["recovery"]}
        manifest = read_json(calibration["path"])
        card = model_card(report)
        tags = {
            **_source_tags(cfg, flow_run_id),
            "mlflow.note.content": card,  # the run's description
            SPLIT_HASH_TAG: calibration["split_hash"],
            "starfish.calibration_dvc_md5": calibration["md5"],
            REGISTER_KEY_TAG: register_key,
        }
        run_id = run_id or _create_run(client, experiment_id, cfg, started_at)
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        with mlflow.start_run(run_id=run_id, log_system_metrics=False) as run:  # a flow's run samples already
            mlflow.log_params(_config_params(cfg))
            costs = {key: float(metrics[key]) for key in ("flops_ratio", "params_ratio", *SERVED_METRICS)
                     if key in metrics}
            latency = {"latency_ratio": float(export["latency_ratio"])} if "latency_ratio" in export else {}
            logged = client.get_run(run_id).data.metrics  # a flow's run has its evaluation already
            mlflow.log_metrics({key: value for key, value in {**{key: float(metrics[key]) for key in METRICS}, **costs,
                                **latency, "heal_seconds": float(healed["heal_seconds"])}.items()
                                if logged.get(key) != value})
            for point in curve:
                mlflow.log_metrics({f"heal_{k}": point[k] for k in ("calibration_loss", "holdout_loss")
                                    if point[k] is not None}, step=point["step"])
            with warnings.catch_warnings():  # MLflow registers two equal local sources and warns about it
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(pd.DataFrame({"id": manifest["ids"]}), source=calibration["path"],
                                                  name="calibration", digest=calibration["split_hash"][:32])
            with warnings.catch_warnings():  # the schema, inferred as the input is logged, has integer ids
                warnings.simplefilter("ignore", UserWarning)
                mlflow.log_input(dataset, context="calibration")
                mlflow.log_input(_test_dataset(cfg, metrics), context="evaluation")
            with tempfile.TemporaryDirectory() as tmp:
                masks_file = Path(tmp) / "masks.safetensors"
                save_file({k: v.contiguous().to(torch.uint8) for k, v in masks.items()}, str(masks_file))
                mlflow.log_artifact(str(masks_file), "masks")
            for path in (report, report.with_suffix(".html"), plot, evaluation["path"], healed["loss_curve"],
                         calibration["path"]):
                mlflow.log_artifact(str(path), "report")
            info = log_served_model(export["path"], export.get("format", "bitmask"), example, signature, model_name)
            model_version = str(info.registered_model_version)
            client.update_model_version(model_name, model_version, description=card)
            if not client.get_registered_model(model_name).description:
                client.update_registered_model(model_name, description=(
                    f"{cfg.model.name} compressed by starfish: pruned, then healed on unlabeled calibration images "
                    "so its internal states align with the dense model's. Each version's description is its model "
                    "card; `challenger` is the latest registration, `champion` the best one that passed the gate."))
            client.set_model_version_tag(model_name, model_version, "recovery", f"{metrics['recovery']:.6f}")
            client.set_model_version_tag(model_name, model_version, "size_bytes", str(export["bytes"]))
            client.set_model_version_tag(model_name, model_version, "size_ratio", f"{export['size_ratio']:.6f}")
            for key in ("flops_ratio", "params_ratio", "latency_ratio"):  # a slim or int8 model's cost against dense
                if key in export:
                    client.set_model_version_tag(model_name, model_version, key, f"{export[key]:.6f}")
            if "latency_ratio" in export:  # dense float ONNX time over the served file's, onnxruntime, batch 32
                client.set_model_version_tag(model_name, model_version, "speedup", f"{1 / export['latency_ratio']:.3f}")
            client.set_model_version_tag(model_name, model_version, "quant", metrics.get("quant", "none"))
            client.set_model_version_tag(model_name, model_version, "format", export.get("format", "bitmask"))
            for key, value in version_tags(cfg, healed["path"]).items():  # what the registry is searched by
                client.set_model_version_tag(model_name, model_version, key, value)
            client.set_model_version_tag(model_name, model_version, REGISTER_KEY_TAG, register_key)
            client.set_registered_model_alias(model_name, CHALLENGER, model_version)
            mlflow.set_tag(VERSION_TAG, f"{model_name}/{model_version}")
    log.info("registered %s version %s (alias %s) from run %s", model_name, model_version, CHALLENGER,
             run.info.run_id)
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "model_name": model_name,
            "version": model_version, "report": str(report), "plot": str(plot), "tracking_uri": uri,
            "recovery": metrics["recovery"]}


def promote(model_name: str, gate: GateConfig, uri: str, version: str | None = None) -> dict[str, Any]:
    """Point `champion` at a version (default: the `challenger`) if it passes the gate.

    It must reach gate.min_recovery and at least the current champion's recovery, so a worse
    challenger never replaces the champion.
    """
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    with registry_lock(client, model_name):  # the champion read is the one replaced
        try:
            candidate = (client.get_model_version(model_name, version) if version is not None
                         else client.get_model_version_by_alias(model_name, CHALLENGER))
        except MlflowException as exc:
            raise StarfishError(f"no {'version ' + version if version else CHALLENGER} of {model_name} "
                                f"in {uri}: {exc.message}") from exc
        candidate_run = client.get_run(candidate.run_id)
        metrics = candidate_run.data.metrics
        try:
            champion = client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException:
            champion = None
        rival = None
        if champion is not None and champion.version != candidate.version:
            rival = (str(champion.version), client.get_run(champion.run_id).data.metrics.get("recovery"))
        reasons = promotion_failures(metrics, candidate.tags or {}, gate, rival)
        if candidate_run.info.status != "FINISHED":
            reasons.append(f"its run {candidate.run_id} is {candidate_run.info.status}, not FINISHED")
        recovery = metrics.get("recovery", float("-inf"))
        promoted = not reasons
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, candidate.version)
            log.info("%s version %s is now %s (recovery %.4f)", model_name, candidate.version, CHAMPION, recovery)
        else:
            log.info("%s version %s stays out: %s", model_name, candidate.version, "; ".join(reasons))
    return {"model_name": model_name, "version": str(candidate.version), "recovery": recovery,
            "promoted": promoted, "reasons": reasons,
            "champion": str(candidate.version) if promoted else (str(champion.version) if champion else None)}


def champion_split(model_name: str, uri: str) -> dict[str, str] | None:
    """The champion's version and the calibration split hash its run was healed on; None when
    the model has no champion (or is not registered)."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    tags = client.get_run(champion.run_id).data.tags
    return {"version": str(champion.version), "split_hash": tags.get(SPLIT_HASH_TAG, "")}
