"""The sweep flow: a sparsity x healer grid fanned out on a task runner, one summary table.

The split is sampled once and each sparsity pruned once; every (sparsity, healer) point is
healed, evaluated and registered in parallel. A point that fails a check is reported, not
registered. With `promote`, the best registered point then goes through the gate.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import absolute, cli, markdown_table, publish, run_cli
from flows.promote import promote as promote_flow
from flows.session import flow_session
from starfish import tracking
from starfish.config import load_config, variant_config
from tasks import evaluate, heal, prune, register, sample_calibration

DEFAULT_SPARSITIES = [0.5, 0.75, 0.9]
DEFAULT_HEALERS = ["none", "layerwise", "starfish"]


def _outcome(future: PrefectFuture) -> tuple[Any, str]:
    """(result or None, what happened) without raising: a failed point is a row, not a crash."""
    future.wait()
    if future.state.is_completed():
        return future.state.result(), future.state.name
    return None, f"{future.state.name}: {future.state.message}"


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(sparsities: list[float] = DEFAULT_SPARSITIES, healers: list[str] = DEFAULT_HEALERS,
          params: str | None = "params.yaml", overrides: list[str] | None = None, workdir: str = "out/sweep",
          calibration: str = "data/calibration.json", model_name: str | None = None,
          tracking_uri: str | None = None, promote: bool = True) -> dict[str, Any]:
    """Compress the model at every sparsity with every healer; register each point that passes."""
    base = load_config(params, overrides)
    workdir, calibration = absolute(workdir), absolute(calibration)
    uri = tracking.tracking_uri(tracking_uri)
    tracking.preflight(uri)  # an unreachable store fails here, before any compute
    name = model_name or tracking.registered_model_name(base)
    heal_configs = {healer: asdict(variant_config(base.heal, healer)) for healer in healers}  # checked up front
    split = sample_calibration(base.to_dict(), calibration)
    points = []
    for sparsity in sparsities:
        pruned = prune.submit(base.replace(prune={"sparsity": sparsity}).to_dict(), split, workdir)
        for healer in healers:
            # every healer variant gets the base config's step budget (faithful keeps its own)
            config = base.replace(prune={"sparsity": sparsity}, heal=heal_configs[healer]).to_dict()
            healed = heal.submit(config, pruned, split, workdir)
            evaluation = evaluate.submit(config, pruned, healed, workdir)
            registered = register.submit(config, split, pruned, healed, evaluation, name, uri, workdir)
            points.append((sparsity, healer, evaluation, registered))

    rows = []
    for sparsity, healer, evaluation, registered in points:
        metrics, _ = _outcome(evaluation)
        entry, status = _outcome(registered)
        rows.append({"sparsity": sparsity, "healer": healer,
                     **{key: (metrics or {}).get(key, float("nan")) for key in ("pruned_top1", "healed_top1", "recovery")},
                     "version": entry["version"] if entry else "", "status": status})
    registered_rows = [row for row in rows if row["version"]]
    best = max(registered_rows, key=lambda row: row["recovery"], default=None)
    decision = promote_flow(name, best["version"], params, overrides, uri) if promote and best else None
    verdict = ("no point was registered" if best is None else
               f"best: sparsity {best['sparsity']:g} + {best['healer']} (v{best['version']}, recovery "
               f"{best['recovery']:.4f})" + (f"; champion: {'yes' if decision['promoted'] else 'no'}" if decision else ""))
    publish("sweep", rows, f"# sweep of {name}\n\n{markdown_table(rows)}\n\n{verdict}.\n", verdict)
    return {"rows": rows, "best": best, "promotion": decision}


def main() -> None:
    parser = cli("Sweep sparsity x healer: compress, evaluate and register every point; promote the best.")
    parser.add_argument("--sparsities", type=float, nargs="+", default=DEFAULT_SPARSITIES)
    parser.add_argument("--healers", nargs="+", default=DEFAULT_HEALERS)
    parser.add_argument("--workdir", default="out/sweep")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args()
    load_config(args.params, args.set)  # a bad config ends here, in one line, before Prefect starts
    with flow_session():
        result = sweep(args.sparsities, args.healers, args.params, args.set, args.workdir,
                       tracking_uri=args.tracking_uri, promote=not args.no_promote)
    print(markdown_table(result["rows"]))


if __name__ == "__main__":
    run_cli(main)
