"""The compress flow: one model through sample -> prune -> heal -> quantize -> evaluate -> register.

`python -m flows.compress` (what `make demo` runs) works on the embedded defaults: Prefect
without a server, MLflow in sqlite:///mlflow.db, the calibration split from the local DVC
stage. A second run with the same inputs reuses every finished step (state `Cached`).

Its result is persisted as plain JSON, so a sweep that started it on a work pool reads it back
(with a result storage every machine reaches; see docs/pipeline.md).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.common import (
    StepStates,
    absolute,
    check_before_prefect,
    cli,
    markdown_table,
    point_config,
    publish,
    ran_on,
    run_cli,
)
from flows.parameters import Settings, as_overrides
from flows.promote import promote as promote_flow
from flows.session import flow_session
from starfish import gate, tracking
from starfish.params import load_config
from tasks import evaluate, heal, prune, quantize, register, sample_calibration
from tasks.pipeline import flow_start
from tasks.results import PlainJSON

DEFAULT_WORKDIR = "out/compress"
DEFAULT_CALIBRATION = "data/calibration.json"


@flow(name="compress", persist_result=True, result_serializer=PlainJSON())
def compress(params: str | None = "params.yaml", overrides: list[str] | None = None,
             workdir: str = DEFAULT_WORKDIR, calibration: str = DEFAULT_CALIBRATION,
             model_name: str | None = None, tracking_uri: str | None = None, promote: bool = True,
             healer: str | None = None, settings: Settings = Settings()) -> dict[str, Any]:
    """Compress one model and register it as `challenger`; with `promote`, then run the gate.
    One MLflow run spans it, from its start: each step's state is tagged as the step ends, the
    evaluation logged before the gate decides, and a failure ends the run FAILED with its line.
    `healer` names a sweep's heal recipe, which replaces the heal section (keeping its budget).
    `settings` sets config fields by type (the form Prefect's UI shows), applied before `overrides`."""
    overrides = [*as_overrides(settings), *(overrides or [])]
    cfg = point_config(load_config(params, overrides), healer=healer)
    config, uri = cfg.to_dict(), tracking.tracking_uri(tracking_uri)
    tracking.preflight(uri)  # an unreachable store fails here, before any compute
    workdir, calibration = absolute(workdir), absolute(calibration)
    name = model_name or tracking.registered_model_name(cfg)
    with tracking.flow_run(cfg, uri, flow_run_id=flow_run.id, started_at=flow_start()) as run_id:
        run = StepStates(lambda step, state: tracking.note_on_run(uri, run_id, {tracking.STEP_TAG + step: state}))
        split = run(sample_calibration, config, calibration)
        pruned = run(prune, config, split, workdir)
        healed = run(heal, config, pruned, split, workdir)
        served = run(quantize, config, healed, split, workdir)
        evaluation = run(evaluate, config, pruned, healed, served, workdir)
        tracking.note_on_run(uri, run_id, metrics={key: evaluation[key] for key in gate.METRICS})
        registered = run(register, config, split, pruned, healed, served, evaluation, name, uri, workdir,
                         mlflow_run_id=run_id)
        tracking.note_on_run(uri, run_id, {tracking.VERSION_TAG: f"{name}/{registered['version']}"})
        decision = promote_flow(name, registered["version"], params, overrides, uri) if promote else None

    outputs = {"sample_calibration": split, "prune": pruned, "heal": healed, "quantize": served,
               "evaluate": evaluation}
    rows = [{"step": step, "state": state, "output": outputs[step]["path"] if step in outputs else registered["run_id"],
             "sha256": outputs[step]["sha256"][:12] if step in outputs else ""} for step, state in run.states.items()]
    metrics = [{key: evaluation[key] for key in gate.METRICS}]
    champion = f", champion: {'yes' if decision['promoted'] else 'no'}" if decision else ""
    publish("compress", rows, "\n".join([
        f"# compress: {cfg.model.name}, {cfg.prune.method} {cfg.prune.sparsity:g}, {cfg.heal.method}, served "
        f"{cfg.quant.mode}", "",
        markdown_table(metrics), "",
        f"Registered **{name}** version {registered['version']} (alias `challenger`{champion}), "
        f"MLflow run `{registered['run_id']}` in `{uri}`.", "",
        f"Calibration split hash `{split['split_hash']}` ({split['num_samples']} images).", "",
        markdown_table(rows), ""]),
        f"{name} v{registered['version']}: recovery {evaluation['recovery']:.4f}")
    return {"calibration": split, "pruned": pruned, "healed": healed, "served": served, "evaluation": evaluation,
            "registered": registered, "promotion": decision, "states": run.states, "ran_on": ran_on()}


def main() -> None:
    parser = cli("Compress one model: sample, prune, heal, quantize, evaluate, register (and promote through the "
                 "gate).")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where step outputs go")
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION, help="calibration split path")
    parser.add_argument("--no-promote", action="store_true", help="register as challenger only")
    args = parser.parse_args()
    check_before_prefect(args)
    with flow_session():
        result = compress(args.params, args.set, args.workdir, args.calibration, tracking_uri=args.tracking_uri,
                          promote=not args.no_promote)
    evaluation, healed, registered = result["evaluation"], result["healed"], result["registered"]
    aliases = "challenger" + (", champion" if (result["promotion"] or {}).get("promoted") else "")
    print(f"\ndense top-1 {evaluation['dense_top1']:.4f} | pruned {evaluation['pruned_top1']:.4f} | "
          f"healed {evaluation['healed_top1']:.4f} | served ({evaluation['quant']}, onnxruntime) "
          f"{evaluation['served_top1']:.4f} | recovery {evaluation['recovery']:.4f} | "
          f"sparsity {evaluation['sparsity']:.4f} | heal {healed['heal_seconds']:.1f}s")
    print(f"registered {registered['model_name']} version {registered['version']} ({aliases}), "
          f"run {registered['run_id']}")
    print(f"steps: {', '.join(f'{step} {state}' for step, state in result['states'].items())}")
    print(f"report: {registered['report']}")
    print(f"plot:   {registered['plot']}  (DVC: `dvc plots show` after `dvc repro`)")
    print(f"MLflow: mlflow ui --backend-store-uri {registered['tracking_uri']}   then open http://127.0.0.1:5000")


if __name__ == "__main__":
    run_cli(main)
