"""The sweep flow: a pruner x structure x sparsity x healer grid, one summary table, the best point promoted.

Two ways to run the grid, chosen by `mode`:

- `local` (one machine): the split is sampled once and each (pruner, structure, sparsity) pruned once;
  every point is healed, evaluated and registered on this process's task runner.
- `pool` (a work pool of GPU workers): every point is its own run of the `compress`
  deployment, started with `run_deployment`, so each worker takes the next point when it
  frees up and the pool's concurrency limit keeps one run per GPU. Each run samples and prunes
  for itself: both steps are deterministic and content-keyed, so points of one sparsity on
  different workers make the same bytes, with the same hashes.

A point that fails (a check, a crash, a lost worker) is a row with its state and message; the
others go on. With `promote`, the best registered point then goes through the gate.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

from prefect import flow, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import absolute, check_before_prefect, cli, markdown_table, point_config, publish, ran_on, run_cli
from flows.promote import promote as promote_flow
from flows.session import flow_session
from starfish import tracking
from starfish.config import PipelineConfig
from starfish.errors import StarfishError
from starfish.params import load_config
from tasks import evaluate, heal, prune, quantize, register, sample_calibration

log = logging.getLogger("starfish.flows")
DEFAULT_SPARSITIES = [0.5, 0.75, 0.9]
DEFAULT_HEALERS = ["none", "layerwise", "starfish"]
COMPRESS_DEPLOYMENT = "compress/compress"
METRICS = ("pruned_top1", "healed_top1", "recovery", "flops_ratio")
# Tracking URIs every worker of a pool reaches; a sqlite or file store lives on one machine.
SHARED_STORES = ("http://", "https://", "databricks")

Point = tuple[str, str, float, str]  # (pruner, structure, sparsity, healer)


def _row(point: Point, metrics: dict[str, Any] | None, version: str, status: str, where: str) -> dict[str, Any]:
    pruner, structure, sparsity, healer = point
    return {"pruner": pruner, "structure": structure, "sparsity": sparsity, "healer": healer,
            **{key: (metrics or {}).get(key, 1.0 if key == "flops_ratio" and metrics else math.nan)
               for key in METRICS},
            "version": version, "status": status, "ran_on": where}


def _outcome(future: PrefectFuture) -> tuple[Any, str]:
    """(result or None, what happened) without raising: a failed point is a row, not a crash."""
    future.wait()
    if future.state.is_completed():
        return future.state.result(), future.state.name
    return None, f"{future.state.name}: {future.state.message}"


def _local_rows(base: PipelineConfig, configs: dict[Point, PipelineConfig], calibration: str, workdir: str,
                name: str, uri: str) -> list[dict[str, Any]]:
    """Every point on this process's task runner; each (pruner, structure, sparsity) is pruned once."""
    split = sample_calibration(base.to_dict(), calibration)
    pruned: dict[tuple[str, str, float], PrefectFuture] = {}
    futures = []
    for point, point_cfg in configs.items():
        key, config = point[:3], point_cfg.to_dict()
        if key not in pruned:
            pruned[key] = prune.submit(point_config(base, point[2], pruner=point[0], structure=point[1]).to_dict(),
                                       split, workdir)
        healed = heal.submit(config, pruned[key], split, workdir)
        served = quantize.submit(config, healed, split, workdir)
        evaluation = evaluate.submit(config, pruned[key], healed, served, workdir)
        futures.append((point, evaluation, register.submit(config, split, pruned[key], healed, served, evaluation,
                                                           name, uri, workdir)))
    rows = []
    for point, evaluation, registered in futures:
        metrics, _ = _outcome(evaluation)
        entry, status = _outcome(registered)
        rows.append(_row(point, metrics, entry["version"] if entry else "", status, ran_on()))
    return rows


def _pool_rows(points: list[Point], deployment: str, params: str | None, overrides: list[str], workdir: str,
               calibration: str, name: str, uri: str, poll_seconds: float) -> list[dict[str, Any]]:
    """Every point as a run of the compress deployment on its work pool; waits for all of them."""
    runs: dict[Point, FlowRun] = {}
    for point in points:
        pruner, structure, sparsity, healer = point
        label = f"{pruner} {structure} {sparsity:g} + {healer}"
        # a retried sweep finds the runs it started instead of starting them again
        runs[point] = run_deployment(
            deployment, timeout=0, flow_run_name=label, idempotency_key=f"{flow_run.id}:{label}",
            parameters={"params": params, "overrides": [*overrides, f"prune.method={pruner}",
                                                        f"prune.structure={structure}", f"prune.sparsity={sparsity}"],
                        "healer": healer, "workdir": workdir, "calibration": calibration, "model_name": name,
                        "tracking_uri": uri, "promote": False})
    log.info("started %d points on %s", len(runs), deployment)
    finished = _wait(runs, poll_seconds)
    rows = []
    for point, run in finished.items():
        where = run.infrastructure_pid or ""
        if not run.state.is_completed():
            rows.append(_row(point, _evaluation(run), "", f"{run.state.name}: {run.state.message}", where))
            continue
        try:
            result = run.state.result()
        except Exception as exc:  # the run finished; its record is what is missing
            rows.append(_row(point, None, "", f"Completed, but its result could not be read ({exc}); give "
                                              "the workers and the sweep one result storage", where))
            continue
        rows.append(_row(point, result["evaluation"], result["registered"]["version"], run.state.name,
                         result["ran_on"]))
    return rows


def _evaluation(run: FlowRun) -> dict[str, Any] | None:
    """The metrics of a point that failed after its evaluate step (at registration's checks, say),
    read from that step's stored result, as a local sweep's row has them; None if it has none."""
    with get_client(sync_client=True) as client:
        steps = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]), name=TaskRunFilterName(like_="evaluate")))
    for step in steps:
        if step.state is not None and step.state.is_completed():
            try:
                return step.state.result()
            except Exception as exc:  # a row without metrics still says why the point failed
                log.warning("cannot read the evaluation of %s (%s)", run.name, exc)
    return None


def check_shared_store(uri: str) -> None:
    """A pool sweep's points register from every worker: the store must be one they all reach."""
    if not uri.startswith(SHARED_STORES):
        raise StarfishError(f"a pool sweep registers from every worker, but the tracking store {uri} is on one "
                            "machine; set --tracking-uri (or MLFLOW_TRACKING_URI) to an MLflow server, http://...")


def _check_deployment(deployment: str) -> None:
    """A missing deployment is a one-line error before any run starts, not a crash midway."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise StarfishError(f"no deployment {deployment!r} on the Prefect API {client.api_url}; set "
                                "PREFECT_API_URL to the server the workers poll and run `prefect deploy --all` "
                                "there") from None


def _wait(runs: dict[Point, FlowRun], poll_seconds: float) -> dict[Point, FlowRun]:
    """The runs again once each is in a final state; logs progress as points finish."""
    ids = {run.id: point for point, run in runs.items()}
    done: dict[Point, FlowRun] = {}
    with get_client(sync_client=True) as client:
        while len(done) < len(ids):
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))):
                point = ids[run.id]
                if point not in done and run.state is not None and run.state.is_final():
                    done[point] = run
                    log.info("point %d/%d: %s %s", len(done), len(ids), run.name, run.state.name)
            if len(done) < len(ids):
                time.sleep(poll_seconds)
    return {point: done[point] for point in runs}


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(sparsities: list[float] = DEFAULT_SPARSITIES, healers: list[str] = DEFAULT_HEALERS,
          params: str | None = "params.yaml", overrides: list[str] | None = None, workdir: str = "out/sweep",
          calibration: str = "data/calibration.json", model_name: str | None = None,
          tracking_uri: str | None = None, promote: bool = True, pruners: list[str] | None = None,
          mode: Literal["local", "pool"] = "local", deployment: str = COMPRESS_DEPLOYMENT,
          poll_seconds: float = 5.0, structures: list[str] | None = None) -> dict[str, Any]:
    """Compress the model at every grid point; register each point that passes; promote the best.
    `pruners` and `structures` default to the params' prune.method and prune.structure; `mode` is
    `local` or `pool` (see above)."""
    base = load_config(params, overrides)
    uri = tracking.tracking_uri(tracking_uri)
    if mode == "pool":
        check_shared_store(uri)  # before the store is opened: a sqlite one on this machine stays untouched
    tracking.preflight(uri)  # an unreachable store fails here, before any compute
    name = model_name or tracking.registered_model_name(base)
    points = [(pruner, structure, sparsity, healer) for pruner in (pruners or [base.prune.method])
              for structure in (structures or [base.prune.structure]) for sparsity in sparsities for healer in healers]
    # every point's config, checked here before any compute
    configs = {point: point_config(base, point[2], point[3], point[0], point[1]) for point in points}
    if mode == "local":
        rows = _local_rows(base, configs, absolute(calibration), absolute(workdir), name, uri)
    elif mode == "pool":
        _check_deployment(deployment)
        # paths stay relative: each worker resolves them in its own clone of the repository
        rows = _pool_rows(points, deployment, params, list(overrides or []), workdir, calibration, name, uri,
                          poll_seconds)
    else:
        raise StarfishError(f"mode={mode!r}: use local (this machine) or pool (runs of {deployment})")

    registered_rows = [row for row in rows if row["version"]]
    best = max(registered_rows, key=lambda row: row["recovery"], default=None)
    decision = promote_flow(name, best["version"], params, overrides, uri) if promote and best else None
    champion = f"; champion: {'yes' if decision['promoted'] else 'no'}" if decision else ""
    verdict = ("no point was registered" if best is None else
               f"best: {best['pruner']} {best['structure']} {best['sparsity']:g} + {best['healer']} "
               f"(v{best['version']}, recovery "
               f"{best['recovery']:.4f}){champion}")
    publish("sweep", rows, f"# sweep of {name}\n\n{markdown_table(rows)}\n\n{verdict}.\n", verdict)
    return {"rows": rows, "best": best, "promotion": decision}


def main() -> None:
    parser = cli("Sweep pruner x structure x sparsity x healer: compress, evaluate and register every point; "
                 "promote the best.")
    parser.add_argument("--sparsities", type=float, nargs="+", default=DEFAULT_SPARSITIES)
    parser.add_argument("--healers", nargs="+", default=DEFAULT_HEALERS)
    parser.add_argument("--pruners", nargs="+", default=None, help="default: the params' prune.method")
    parser.add_argument("--structures", nargs="+", default=None,
                        help="prune.structure values, e.g. unstructured neurons+heads (default: the params')")
    parser.add_argument("--workdir", default="out/sweep")
    parser.add_argument("--no-promote", action="store_true")
    parser.add_argument("--mode", choices=["local", "pool"], default="local",
                        help="local: every point in this process; pool: each point a run of --deployment")
    parser.add_argument("--deployment", default=COMPRESS_DEPLOYMENT, help="the compress deployment (pool mode)")
    args = parser.parse_args()
    if args.mode == "pool":  # before the store is opened: a sqlite one on this machine stays untouched
        check_shared_store(tracking.tracking_uri(args.tracking_uri))
    check_before_prefect(args)
    with flow_session():
        result = sweep(args.sparsities, args.healers, args.params, args.set, args.workdir,
                       tracking_uri=args.tracking_uri, promote=not args.no_promote, pruners=args.pruners,
                       mode=args.mode, deployment=args.deployment, structures=args.structures)
    print(markdown_table(result["rows"]))


if __name__ == "__main__":
    run_cli(main)
