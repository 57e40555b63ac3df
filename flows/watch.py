"""The watch flow: a Prefect event when the calibration split is not the one the champion was built on.

The split is brought up to date as compress does it (its DVC stage, else sampled), and its
content hash is compared with the one recorded on the run behind the registered model's
`champion`. When they differ, the flow emits `starfish.calibration.changed`; the trigger on
the `compress` deployment in prefect.yaml then reruns compress on the new split, which
registers a challenger that the gate may promote. Deployed on a schedule, it turns a new data
version (`dvc push` of a new split) into a rerun without anyone starting one.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.events import emit_event

from flows.common import absolute, check_before_prefect, cli, run_cli
from flows.session import flow_session
from starfish import tracking
from starfish.params import load_config
from tasks import sample_calibration

log = logging.getLogger("starfish.flows")
CALIBRATION_CHANGED = "starfish.calibration.changed"


def calibration_resource(model_name: str) -> str:
    """The event's resource id: one per registered model, what the deployment trigger matches."""
    return f"starfish.calibration.{model_name}"


@flow(name="watch-calibration")
def watch_calibration(params: str | None = "params.yaml", overrides: list[str] | None = None,
                      calibration: str = "data/calibration.json", model_name: str | None = None,
                      tracking_uri: str | None = None) -> dict[str, Any]:
    """Compare the split's hash with the champion's; emit the event when they differ."""
    cfg = load_config(params, overrides)
    uri = tracking.tracking_uri(tracking_uri)
    tracking.preflight(uri)
    name = model_name or tracking.registered_model_name(cfg)
    split = sample_calibration(cfg.to_dict(), absolute(calibration))
    champion = tracking.champion_split(name, uri)
    changed = champion is not None and champion["split_hash"] != split["split_hash"]
    outcome = {"model_name": name, "split_hash": split["split_hash"], "calibration": split["path"],
               "champion_version": champion["version"] if champion else None,
               "champion_split_hash": champion["split_hash"] if champion else None, "changed": changed}
    if champion is None:
        log.info("%s has no champion yet: nothing to compare the split with", name)
    elif changed:
        emit_event(event=CALIBRATION_CHANGED, payload=outcome,
                   resource={"prefect.resource.id": calibration_resource(name), "prefect.resource.name": name})
        log.info("calibration split %s differs from champion v%s's %s: emitted %s", split["split_hash"][:12],
                 champion["version"], champion["split_hash"][:12], CALIBRATION_CHANGED)
    else:
        log.info("calibration split %s is the one champion v%s was built on", split["split_hash"][:12],
                 champion["version"])
    return outcome


def main() -> None:
    parser = cli("Emit starfish.calibration.changed when the calibration split differs from the champion's.")
    parser.add_argument("--calibration", default="data/calibration.json", help="calibration split path")
    parser.add_argument("--model-name", default=None, help="registered model (default: from model.name)")
    args = parser.parse_args()
    check_before_prefect(args)
    with flow_session():
        outcome = watch_calibration(args.params, args.set, args.calibration, args.model_name, args.tracking_uri)
    if outcome["champion_version"] is None:
        print(f"{outcome['model_name']} has no champion: nothing to compare")
    else:
        verdict = f"changed: emitted {CALIBRATION_CHANGED}" if outcome["changed"] else "unchanged"
        print(f"calibration split {outcome['split_hash'][:12]}, champion v{outcome['champion_version']} built on "
              f"{outcome['champion_split_hash'][:12]}: {verdict}")


if __name__ == "__main__":
    run_cli(main)
