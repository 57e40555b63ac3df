"""The compress run's report: `report.md` and `report.html` with the metrics, the calibration
split and what the held-out slice decided, and the healing loss plot (`loss.png`, embedded);
`model_card` is its text for MLflow descriptions.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from starfish.config import PipelineConfig
from starfish.gate import METRICS, SERVED_METRICS
from starfish.io import atomic_write_bytes, read_json, sidecar_path
from starfish.plots import save_png, subplots


def write_report(out_dir: str | Path, cfg: PipelineConfig, metrics: dict[str, Any], calibration: dict[str, Any],
                 healed: dict[str, Any], curve: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write `report.md` and `loss.png` (calibration and held-out loss per step) into `out_dir`;
    `healed` is the heal step's result (checkpoint path, wall time), `curve` its loss curve."""
    out_dir = Path(out_dir)
    heal_report = read_json(sidecar_path(healed["path"])).get("report", {})
    figure, axis = subplots(figsize=(5.5, 3.4))
    steps = [p["step"] for p in curve]
    axis.plot(steps, [p["calibration_loss"] for p in curve], marker=".", label="calibration (training batches)")
    if any(p["holdout_loss"] is not None for p in curve):
        axis.plot(steps, [p["holdout_loss"] for p in curve], marker=".", linestyle="--", label="held-out slice")
    if isinstance(heal_report.get("selected_step"), int):
        axis.axvline(heal_report["selected_step"], color="grey", linewidth=0.8, label="kept state")
    axis.set(xlabel="Adam step", ylabel="alignment loss", title=f"{cfg.heal.method} ({cfg.heal.preset}) healing loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    plot = save_png(figure, out_dir / "loss.png", dpi=100)
    title = (f"{cfg.model.name}: {cfg.prune.method} {cfg.prune.sparsity:g}"
             + (f" {cfg.prune.structure}" if cfg.prune.structured else "") + f" + {cfg.heal.method}"
             + (f" + {cfg.quant.mode}" if cfg.quant.mode != "none" else ""))
    rows = [(key, f"{metrics[key]:.4f}") for key in (*METRICS, *SERVED_METRICS, "flops_ratio", "params_ratio")
            if key in metrics]
    if "quant" in metrics:
        rows.append(("served as", f"ONNX in onnxruntime, {metrics['quant']}"))
    split = (f"Calibration split: {calibration['num_samples']} images, content hash `{calibration['split_hash']}`, "
             f"DVC md5 `{calibration['md5']}`.")
    selection = _selection_line(heal_report) + f" It took {healed['heal_seconds']:.1f} s."
    png = base64.b64encode(plot.read_bytes()).decode()
    # the plot embedded, so the report shows it wherever it is opened; MLflow's artifact viewer
    # shows images in HTML only (its markdown view drops data: links), hence report.html beside it
    markdown = [f"# {title}", "", "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
                split, "", selection, "", f"![healing loss](data:image/png;base64,{png})", ""]
    report = out_dir / "report.md"
    atomic_write_bytes(report, "\n".join(markdown).encode())
    cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    paragraphs = "".join(f"<p>{html.escape(text).replace('`', '')}</p>" for text in (split, selection))
    atomic_write_bytes(out_dir / "report.html", (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<body style='font-family:sans-serif;max-width:46em'>"
        f"<h1>{html.escape(title)}</h1><table border='1' cellpadding='4' style='border-collapse:collapse'>"
        f"<tr><th>metric</th><th>value</th></tr>{cells}</table>{paragraphs}"
        f"<img alt='healing loss' src='data:image/png;base64,{png}'></body>\n").encode())
    return report, plot


def model_card(report: str | Path) -> str:
    """The report as text for MLflow descriptions (run, version): without its embedded plot, which
    is larger than a description may be, and pointing at the plot's artifact instead."""
    text = "\n".join(line for line in Path(report).read_text().splitlines()
                     if not line.startswith("![healing loss](data:"))
    return text.rstrip() + ("\n\nThe healing loss plot: artifacts `report/loss.png`, and in `report/report.html`, "
                            "which MLflow's artifact viewer shows with its plot.\n")


def _selection_line(report: dict[str, Any]) -> str:
    """What the held-out slice decided, in words."""
    if "selected_step" not in report:
        return f"Healing ran {report.get('steps', '?')} steps on every calibration image; the last state is kept."
    if report.get("kept_pruned"):
        return (f"**No healed state beat the pruned model on the {report['holdout_images']} held-out images: "
                "the registered weights are the pruned ones.**")
    return (f"Healing ran {report['steps']} steps on {report['train_images']} images; the state kept is step "
            f"{report['selected_step']}, best of the checks on {report['holdout_images']} held-out images "
            f"(loss {report['holdout_loss']:.4f}).")
