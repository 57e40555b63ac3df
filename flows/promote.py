"""The promote flow: move the registry's `champion` alias to a version only through the gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import check_before_prefect, cli, markdown_table, publish, run_cli
from flows.session import flow_session
from starfish import tracking
from starfish.params import load_config
from tasks import promote_version


@flow(name="promote")
def promote(model_name: str | None = None, version: str | None = None, params: str | None = "params.yaml",
            overrides: list[str] | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Promote `version` (default: the `challenger`) if its recovery reaches gate.min_recovery and
    the current champion's."""
    cfg = load_config(params, overrides)
    uri = tracking.tracking_uri(tracking_uri)
    tracking.preflight(uri)
    decision = promote_version(model_name or tracking.registered_model_name(cfg), cfg.to_dict()["gate"], uri, version)
    row = {"model": decision["model_name"], "version": decision["version"], "recovery": decision["recovery"],
           "promoted": decision["promoted"], "champion": decision["champion"] or "none"}
    verdict = "promoted to champion" if decision["promoted"] else "not promoted: " + "; ".join(decision["reasons"])
    publish("promote", [row], f"# Promotion\n\n{markdown_table([row])}\n\nVersion {decision['version']} {verdict}.\n",
            f"{decision['model_name']} v{decision['version']}: {verdict}")
    return decision


def main() -> None:
    parser = cli("Promote a registered model version to `champion` through the gate.")
    parser.add_argument("--model-name", default=None, help="registered model (default: from model.name)")
    parser.add_argument("--version", default=None, help="version to promote (default: the challenger)")
    args = parser.parse_args()
    check_before_prefect(args)
    with flow_session():
        decision = promote(args.model_name, args.version, args.params, args.set, args.tracking_uri)
    print(f"{decision['model_name']} v{decision['version']}: "
          f"{'champion' if decision['promoted'] else 'not promoted (' + '; '.join(decision['reasons']) + ')'}")


if __name__ == "__main__":
    run_cli(main)
