"""The pipeline's steps as plain functions over files: sample, prune, heal, evaluate.

The CLI, the DVC stages and the Prefect tasks all call these, so each step exists once. Every
step reads its inputs by path, writes its output atomically with a `.meta.json` sidecar
(config, input hashes, metrics), and returns a small dict of paths, hashes and numbers.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from starfish.calibration import (
    CalibrationImages,
    build_manifest,
    load_images,
    read_manifest,
    resolve_manifest,
    write_manifest,
)
from starfish.config import PipelineConfig
from starfish.datasets import ImageDataset, load_dataset
from starfish.errors import StarfishError
from starfish.evaluate import check_masks_hold, compare, measured_sparsity, predict
from starfish.fingerprints import result_fields
from starfish.formats import bitmask
from starfish.formats.checkpoint import checkpoint_bytes, checkpoint_metadata, read_checkpoint
from starfish.healing import heal_
from starfish.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    read_json,
    sha256_bytes,
    sha256_file,
    sidecar_path,
    write_with_sidecar,
)
from starfish.models import (
    create_model,
    load_checkpoint,
    model_from,
    model_spec,
    on_meta,
    save_checkpoint,
    state_sha256,
)
from starfish.precision import resolve_device, resolve_precision
from starfish.pruning import prune, remove_units_, sparsify_
from starfish.pruning.groups import StructurePlan, find_groups
from starfish.pruning.masks import Masks
from starfish.pruning.slim import architecture_of, kept_by_group, recorded_structure, size_ratios
from starfish.rows import scratch_folder

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("step", "calibration_loss", "holdout_loss")
CHECK_BATCH = 32  # calibration images an ONNX file is checked on


def dense_model(cfg: PipelineConfig) -> torch.nn.Module:
    model = create_model(cfg.model.name, checkpoint=cfg.model.checkpoint, pretrained=cfg.model.pretrained,
                         num_classes=cfg.model.num_classes, kwargs=cfg.model.kwargs)
    return model.to(resolve_device(cfg.model.device))


def _lineage(cfg: PipelineConfig, dense_sha256: str) -> dict[str, Any]:
    """Checkpoint metadata a pruned or healed model carries: the timm kwargs that rebuild its
    architecture, when there are any, and the hash of the dense weights it was pruned from
    (`models.state_sha256`)."""
    return {**({"model_kwargs": cfg.model.kwargs} if cfg.model.kwargs else {}), "dense_state_sha256": dense_sha256}


def check_same_dense(cfg: PipelineConfig, dense_sha256: str, *paths: str | Path) -> None:
    """Refuse a pruned or healed checkpoint that was not made from the configured dense model
    (whose state hashes to `dense_sha256`): another model name, other timm kwargs, or other
    dense weights (`_lineage`)."""
    for path in paths:
        metadata = checkpoint_metadata(path)
        name, _, kwargs = model_spec(metadata, path)
        if name != cfg.model.name:
            raise StarfishError(f"{path} is a {name}, but model.name is {cfg.model.name}; use the config it was "
                                "pruned with")
        if kwargs != dict(cfg.model.kwargs):
            raise StarfishError(f"{path} was pruned with model.kwargs={kwargs}, but the config has "
                                f"model.kwargs={dict(cfg.model.kwargs)}; use the config it was pruned with")
        recorded = metadata.get("dense_state_sha256")
        if recorded is not None and recorded != dense_sha256:
            raise StarfishError(f"{path} was pruned from other dense weights than model.checkpoint="
                                f"{cfg.model.checkpoint}; use the dense checkpoint it was pruned from, or prune "
                                "again")


def stored_model(cfg: PipelineConfig, path: str | Path) -> tuple[torch.nn.Module, Masks, str]:
    """A pruned or healed checkpoint on the configured device: (model, masks, model name)."""
    model, masks, name = load_checkpoint(path)
    return model.to(resolve_device(cfg.model.device)), masks, name


def pruned_checkpoint(cfg: PipelineConfig, path: str | Path) -> tuple[torch.nn.Module, Masks, str]:
    """`stored_model` for an input that must be a pruned checkpoint: one without masks is refused."""
    model, masks, name = stored_model(cfg, path)
    if not masks:
        raise StarfishError(f"{path} carries no pruning masks, so it is not a pruned checkpoint; "
                            "pass the output of `starfish prune`")
    return model, masks, name


def dataset(cfg: PipelineConfig, split: str, model: torch.nn.Module) -> ImageDataset:
    return load_dataset(cfg.data.kind, cfg.data.root, split, model)


def calibration_images(cfg: PipelineConfig, manifest: str | Path, model: torch.nn.Module,
                       limit: int | None = None) -> CalibrationImages:
    """The manifest's images (its first `limit`, e.g. an input example), after checking they
    still match its content hash: in RAM with `heal.cache=memory`, else in a scratch file."""
    train = dataset(cfg, "train", model)
    return load_images(train, resolve_manifest(manifest, train)[:limit], cfg.data.num_workers,
                       on_disk=cfg.heal.cache != "memory")


def check_outputs(cfg: PipelineConfig, outputs: list[str | Path], inputs: list[str | Path]) -> None:
    """`check_writable`, counting the configured dense checkpoint among the inputs."""
    check_writable(outputs, [*inputs, cfg.model.checkpoint])


def check_writable(outputs: list[str | Path], inputs: list[str | Path | None]) -> None:
    """Refuse, before any work, outputs that would overwrite an input (or its sidecar) or that
    cannot be written: the nearest existing folder above each must be writable. Writes nothing."""
    sources = [Path(p) for p in inputs if p]
    taken = {path.resolve(): path for source in sources for path in (source, sidecar_path(source))}
    for out in map(Path, outputs):
        for written in (out, sidecar_path(out)):
            if written.resolve() in taken:
                raise StarfishError(f"output {written} is the input {taken[written.resolve()]}; writing it would "
                                    "destroy that input: choose another --out")
        folder = out.resolve().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise StarfishError(f"cannot write {out}: {folder} is not a writable folder; choose another --out")


def _checkpoint_sha(cfg: PipelineConfig) -> str | None:
    return sha256_file(cfg.model.checkpoint) if cfg.model.checkpoint else None


def sample(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    """Write the calibration manifest (ids + content hash) for `cfg.calibration`."""
    check_outputs(cfg, [out], [])
    model = dense_model(cfg)
    manifest = build_manifest(dataset(cfg, "train", model), cfg.data.kind, cfg.calibration.fraction,
                              cfg.calibration.seed, cfg.data.num_workers)
    write_with_sidecar(out, lambda path: write_manifest(path, manifest),
                       config={"data": asdict(cfg.data), "calibration": asdict(cfg.calibration)})
    log.info("calibration split: %d of %d images, hash %s", manifest["num_samples"], manifest["num_source"],
             manifest["content_sha256"][:12])
    return split_info(out)


def split_info(manifest: str | Path) -> dict[str, Any]:
    """A manifest's file and content hashes and what it was drawn with (also for one made by DVC)."""
    data = read_manifest(manifest)
    return {"path": str(manifest), "sha256": sha256_file(manifest), "split_hash": data["content_sha256"],
            "num_samples": data["num_samples"], "dataset": data["dataset"], "fraction": data["fraction"],
            "seed": data["seed"]}


def prune_step(cfg: PipelineConfig, manifest: str | Path, out: str | Path) -> dict[str, Any]:
    """Prune the dense model; write the pruned weights and masks as one checkpoint."""
    check_outputs(cfg, [out], [manifest])
    model = dense_model(cfg)
    lineage = _lineage(cfg, state_sha256(model))
    read_manifest(manifest)  # an input of the step even when the pruner reads no images
    images = calibration_images(cfg, manifest, model) if cfg.prune.reads_images else None
    masks, held, plan = prune(model, cfg.prune, images)
    sparsity = measured_sparsity(sparsify_(model, masks), list(masks))  # before slimming leaves nothing zero
    extra: dict[str, Any] = {"held_back": held} if held else {}
    if plan is not None:
        if plan.skipped:
            log.warning("%d blocks keep all their units, so FLOPs fall by less than prune.sparsity: %s",
                        len(plan.skipped), "; ".join(f"{block}: {why}" for block, why in list(plan.skipped.items())[:5])
                        + (" ..." if len(plan.skipped) > 5 else ""))
        masks, extra["structure"] = remove_units_(model, masks, plan, cfg.prune.slim)
    inputs = {"dense_sha256": _checkpoint_sha(cfg), "manifest_sha256": sha256_file(manifest)}
    meta = write_with_sidecar(out, lambda path: save_checkpoint(path, model, cfg.model.name, masks=masks,
                                                                         metadata=lineage),
                              config={"model": asdict(cfg.model), "prune": asdict(cfg.prune)}, inputs=inputs,
                              sparsity=sparsity, **extra)
    log.info("pruned %d layers, measured sparsity %.4f", len(masks), sparsity["total"])
    return {"path": str(out), "sha256": meta["sha256"], "sparsity": sparsity["total"],
            **({"structure": extra["structure"]} if "structure" in extra else {})}


def structure_report(model: torch.nn.Module, dense: torch.nn.Module, masks: Masks, structure: str) -> dict[str, Any]:
    """What structured pruning removed from `dense`, measured from `model`'s masks or slim record
    (`StructurePlan.report`)."""
    plan = StructurePlan.find(dense, structure)
    return plan.report(kept_by_group(model, masks, plan.groups))


def heal_step(cfg: PipelineConfig, pruned: str | Path, manifest: str | Path, out: str | Path) -> dict[str, Any]:
    """Heal the pruned checkpoint on the calibration split; write the healed checkpoint and loss curve.

    The wall times (the heal's, and its warm start's) are returned and logged, never written into
    the outputs: they hold only what the inputs determine, so a rerun writes the same bytes and
    `dvc.lock` stays put."""
    check_outputs(cfg, [out, curve_path(out)], [pruned, manifest])
    dense = dense_model(cfg)
    dense_sha256 = state_sha256(dense)
    check_same_dense(cfg, dense_sha256, pruned)
    model, masks, name = pruned_checkpoint(cfg, pruned)
    with scratch_folder(Path(out).parent), \
            contextlib.closing(calibration_images(cfg, manifest, dense)) as images:  # scratch files beside the output
        start = time.perf_counter()
        report = heal_(model, dense, masks, images, cfg.heal)
        seconds = time.perf_counter() - start
    check_masks_hold(model, masks)
    inputs = {"pruned_sha256": sha256_file(pruned), "manifest_sha256": sha256_file(manifest)}
    # times change from run to run, so they stay out of the sidecar (whose bytes a rerun reproduces)
    timings = {"heal_seconds": seconds, **({"warm_start_seconds": report.pop("warm_start_seconds")}
                                           if "warm_start_seconds" in report else {}),
               **{f"{part}_seconds": value for part, value in report.pop("seconds", {}).items()}}
    report.pop("step_seconds", None)
    curve, curve_text = curve_path(out), curve_csv(report.pop("curve", [])).encode()
    atomic_write_bytes(curve, curve_text)  # a side output, first: the sidecar records its hash
    meta = write_with_sidecar(out, lambda path: save_checkpoint(path, model, name, masks=masks,
                                                                         metadata=_lineage(cfg, dense_sha256)),
                              config={"heal": asdict(cfg.heal)}, inputs=inputs, report=report,
                              loss_curve_sha256=sha256_bytes(curve_text))
    if report.get("kept_pruned"):
        log.warning("healing did not improve the held-out alignment: %s holds the pruned weights", out)
    log.info("healed with %s in %.1fs", cfg.heal.method, seconds)
    return {"path": str(out), "sha256": meta["sha256"], **timings, "loss_curve": str(curve)}


EXPORT_SUFFIXES = {"bitmask": ".safetensors", "onnx": ".onnx"}


def _check_export_out(out: Path, kind: str, force: bool) -> None:
    """An export is a file a user hands on: it has its format's extension, and an existing one
    is kept unless `force` says to write over it."""
    suffix = EXPORT_SUFFIXES[kind]
    if out.suffix != suffix:
        raise StarfishError(f"--out {out}: a {kind} export is written as {suffix}; name it {out.stem}{suffix}")
    if out.exists() and not force:
        raise StarfishError(f"--out {out} exists; choose another path, or pass --force to write over it")


def export_step(checkpoint: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write a pruned or healed checkpoint in the compressed sparse-bitmask format
    (`starfish.formats.bitmask`); `load_checkpoint` reads it back bit-exactly. The sidecar records
    the sizes: the whole file against the same model stored dense, and the pruned weights
    against the bitmask ideal."""
    source, out = Path(checkpoint), Path(out)
    check_writable([out], [source])
    _check_export_out(out, "bitmask", force)
    read = read_checkpoint(source)
    model_from(read, source)  # the model it names is built and its state and masks checked against it
    state, masks, metadata = read
    if "architecture" in metadata:
        raise StarfishError(f"{source} is a slim model (structured pruning): its weights are dense and already "
                            "small; export it with --format onnx")
    if not masks:
        raise StarfishError(f"{source} carries no pruning masks, so there is nothing to compress; "
                            "export a checkpoint that `starfish prune` or `starfish heal` wrote")
    tensors = bitmask.compress(state, masks)
    data = checkpoint_bytes(tensors, {**metadata, "format": bitmask.FORMAT})
    dense = len(checkpoint_bytes(state, metadata))
    pruned, ideal = bitmask.pruned_bytes(tensors)
    sizes = {"bytes": len(data), "dense_bytes": dense, "size_ratio": len(data) / dense,
             "pruned_weight_bytes": pruned, "pruned_weight_ideal_bytes": round(ideal),
             "pruned_weight_over_ideal": pruned / ideal - 1}
    meta = write_with_sidecar(out, lambda path: path.write_bytes(data),
                              inputs={"checkpoint_sha256": sha256_file(source)}, sizes=sizes)
    log.info("exported %s: %d bytes, %.3fx of dense; pruned weights %.2f%% over the bitmask ideal", out, len(data),
             sizes["size_ratio"], 100 * sizes["pruned_weight_over_ideal"])
    return {"path": str(out), "sha256": meta["sha256"], **sizes}


def _onnx_source(source: Path) -> tuple[torch.nn.Module, tuple[int, ...], dict[str, Any], dict[str, float]]:
    """What an ONNX file of checkpoint `source` is made from: (the model, its input size, the
    file's `starfish.*` metadata, its parameter and FLOP ratios against the dense architecture)."""
    from timm.data import resolve_data_config

    read = read_checkpoint(source)
    model, _, name = model_from(read, source)
    metadata = read[2]
    _, num_classes, kwargs = model_spec(metadata, source)
    input_size = tuple(resolve_data_config({}, model=model)["input_size"])
    ratios = size_ratios(model, create_model(name, num_classes=num_classes, kwargs=kwargs), input_size)
    tags = {"model": name, "checkpoint_sha256": sha256_file(source), "input_size": list(input_size),
            **{key: metadata[key] for key in ("architecture", "model_kwargs", "num_classes") if key in metadata}}
    return model, input_size, tags, ratios


def onnx_export_step(checkpoint: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write a checkpoint (dense, pruned, healed or slim) as ONNX (`starfish.formats.onnx`): it
    passes onnx.checker and onnxruntime matches torch within 1e-4 before it is kept. The sidecar
    records the check, and the parameters and FLOPs against the dense architecture."""
    from starfish.formats.onnx import export_onnx

    source, out = Path(checkpoint), Path(out)
    check_writable([out], [source])
    _check_export_out(out, "onnx", force)
    model, input_size, tags, ratios = _onnx_source(source)
    check: dict[str, Any] = {}
    meta = write_with_sidecar(out, lambda path: check.update(export_onnx(model, path, input_size, tags)),
                              inputs={"checkpoint_sha256": tags["checkpoint_sha256"]}, format="onnx",
                              input_size=list(input_size), check=check, **ratios)
    log.info("exported %s as ONNX: onnxruntime within %.1e of torch; %.3fx of dense's FLOPs", out,
             check["max_abs_difference"], ratios["flops_ratio"])
    return {"path": str(out), "sha256": meta["sha256"], "format": "onnx", **check, **ratios}


def quantize_step(cfg: PipelineConfig, healed: str | Path, manifest: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the model as it is served: the healed checkpoint as ONNX, quantized to int8 by
    onnxruntime when `quant.mode` says so (`starfish.quant.ort`; static ranges from the
    calibration split, never the test set), float otherwise. Either is checked before it is kept
    (float: against torch within 1e-4; int8: against the torch fake-quant model). The sidecar
    records the recipe, the input hashes, the split's content hash, the check and the costs."""
    from starfish.formats.onnx import export_onnx
    from starfish.quant.ort import write_int8

    source, out = Path(healed), Path(out)
    check_outputs(cfg, [out], [source, manifest])
    model, input_size, tags, ratios = _onnx_source(source)
    split = read_manifest(manifest)["content_sha256"]
    tags.update(calibration_split_hash=split, quant=cfg.quant.mode)
    check: dict[str, Any] = {}
    with scratch_folder(out.parent), contextlib.closing(calibration_images(cfg, manifest, model)) as images:
        def write(path: Path) -> None:
            if cfg.quant.mode == "none":
                check.update(export_onnx(model, path, input_size, tags, images[:CHECK_BATCH]))
            else:
                check.update(write_int8(model, path, input_size, tags, cfg.quant.mode, images))

        meta = write_with_sidecar(out, write, config={"quant": asdict(cfg.quant)}, format="onnx",
                                  inputs={"healed_sha256": tags["checkpoint_sha256"],
                                          "manifest_sha256": sha256_file(manifest)},
                                  calibration_split_hash=split, input_size=list(input_size), check=check,
                                  **ratios)
    size = out.stat().st_size
    log.info("served model %s (%s): %d bytes, %.3fx of dense's FLOPs", out, cfg.quant.mode, size,
             ratios["flops_ratio"])
    return {"path": str(out), "sha256": meta["sha256"], "format": "onnx", "quant": cfg.quant.mode, "bytes": size,
            **check, **ratios}


def _onnx_info(path: Path) -> dict[str, Any]:
    """`checkpoint_info` of an ONNX file: read through the serving checks, never a session."""
    from starfish.formats.onnx import describe_onnx

    described = describe_onnx(path)
    info = {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), "format": "onnx",
            "model": described["metadata"]["model"], "quant": described["metadata"].get("quant", "none"),
            **described}
    side = sidecar_path(path)
    if side.is_file():
        info["sidecar"] = {"path": str(side), "matches": read_json(side).get("sha256") == info["sha256"]}
    return info


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint or export holds, read and checked as every step reads it: the model,
    its format, the masks per layer (kept fraction) or, for a slim model, the units each
    narrowed group kept, and whether its sidecar (if any) records this file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return _onnx_info(path)
    read = read_checkpoint(path)
    model, masks, name = model_from(read, path)
    metadata = read[2]
    _, num_classes, kwargs = model_spec(metadata, path)
    weights = dict(model.named_parameters())
    layers = {key: {"shape": list(mask.shape), "kept": float(mask.float().mean())} for key, mask in masks.items()
              if not mask.all()}
    info: dict[str, Any] = {
        "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), "model": name,
        "num_classes": num_classes, "model_kwargs": kwargs,
        "format": metadata.get("format", "checkpoint"), "slim": architecture_of(model) is not None,
        "parameters": sum(w.numel() for w in weights.values()),
        "sparsity": measured_sparsity(model, list(layers))["total"] if layers else 0.0,
        "masked_layers": layers, "dense_state_sha256": metadata.get("dense_state_sha256"),
    }
    if info["slim"]:
        with on_meta():  # the dense twin's unit counts, without allocating it
            dense = create_model(name, num_classes=num_classes, kwargs=kwargs)
        units = {g.name: (g.structure, g.units) for g in find_groups(dense)}
        info["narrowed"] = {group: {"structure": units[group][0], "kept": len(kept), "of": units[group][1]}
                            for group, kept in kept_by_group(model, masks).items()}
        structure = recorded_structure(model, dense)
        if structure is not None:
            info["skipped"] = StructurePlan.find(dense, structure).skipped
    side = sidecar_path(path)
    if side.is_file():
        meta = read_json(side)
        info["sidecar"] = {"path": str(side), "matches": meta.get("sha256") == info["sha256"],
                           **{key: meta[key] for key in ("config", "inputs", "sizes", "report") if key in meta}}
    return info


@contextlib.contextmanager
def registration_inputs(cfg: PipelineConfig, manifest: str | Path, healed: dict[str, Any],
                        served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """What registering `healed` (the heal step's result) records, as `tracking.log_compress_run`'s
    keyword arguments, so the recorder loads nothing: the healed model on the CPU and its masks,
    an input example (the split's first two images, not all of it), the loss curve, and the file
    that is registered: `served` (the quantize step's ONNX file) for an int8 or a slim model,
    with its speed against the dense model's float ONNX file measured here in onnxruntime; the
    compressed bitmask export of a masked float model (in a temporary folder, gone when the
    block ends)."""
    model, masks, _ = stored_model(cfg.replace(model={"device": "cpu"}), healed["path"])
    example = calibration_images(cfg, manifest, model, limit=2)[:].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        if served["quant"] == "none" and architecture_of(model) is None:
            export = export_step(healed["path"], Path(tmp) / "model.sparse.safetensors")
        else:
            dense = dense_model(cfg.replace(model={"device": "cpu"}))
            registered = Path(tmp) / "model.onnx"  # the artifact's name in the registry, whatever the step's
            shutil.copyfile(served["path"], registered)
            export = {**served, "path": str(registered),
                      "latency_ratio": served_latency_ratio(registered, dense, example, Path(tmp))}
            export["size_ratio"] = export["bytes"] / len(checkpoint_bytes(dense.state_dict(), {}))
        yield {"model": model, "masks": masks, "example": example, "curve": read_curve(healed["loss_curve"]),
               "export": export}


def served_latency_ratio(served: str | Path, dense: torch.nn.Module, example: np.ndarray, folder: Path,
                         batch: int = 32, repeats: int = 10) -> float:
    """The served ONNX model's time over the dense model's float ONNX export for a forward pass
    at `batch` on this machine (onnxruntime, medians of alternating runs): the latency a
    registered version records."""
    from timm.data import resolve_data_config

    from starfish.formats.onnx import export_onnx, run_session, session
    from starfish.timing import median_ratio

    input_size = tuple(resolve_data_config({}, model=dense)["input_size"])
    export_onnx(dense.float().cpu().eval(), folder / "dense.onnx", input_size, {"model": "dense"})
    x = np.ascontiguousarray(np.broadcast_to(example[:1], (batch, *example.shape[1:])), dtype=np.float32)
    dense_session, served_session = session(folder / "dense.onnx"), session(served)
    dense_s, served_s, _ = median_ratio(lambda: run_session(dense_session, x), lambda: run_session(served_session, x),
                                        repeats, lambda: None)
    return served_s / dense_s


def curve_path(healed: str | Path) -> Path:
    """Where the heal step writes its loss curve: `<healed stem>_loss.csv` beside the checkpoint."""
    return Path(healed).with_name(Path(healed).stem + "_loss.csv")


def curve_csv(curve: list[dict[str, Any]]) -> str:
    """The healing curve as CSV: step, calibration loss (training batches), held-out loss (empty without one)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for point in curve:
        writer.writerow([point["step"]] + ["" if point[k] is None else f"{point[k]:.6f}" for k in CURVE_COLUMNS[1:]])
    return buffer.getvalue()


def read_curve(path: str | Path) -> list[dict[str, float | None]]:
    """Read `curve_csv` back: one dict per point, None where a value is empty."""
    with open(path, newline="") as handle:
        return [{k: (float(v) if v != "" else None) if k != "step" else int(v) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def cache_root() -> Path:
    """Where reusable derived data goes: $STARFISH_CACHE_DIR, else $XDG_CACHE_HOME/starfish or ~/.cache/starfish."""
    if os.environ.get("STARFISH_CACHE_DIR"):
        return Path(os.environ["STARFISH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "starfish"


def cached_dense_predictions(cfg: PipelineConfig, dense: torch.nn.Module,
                             test: ImageDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dense model's test predictions, computed once per (dense checkpoint bytes, model
    settings, test files, evaluation settings, device type) and reused by every evaluate step
    and sweep point after. None for a model without a local checkpoint (nothing to key it on)."""
    if not cfg.model.checkpoint:
        return None
    base, device = getattr(test, "dataset", test), resolve_device(cfg.model.device)
    key = sha256_bytes(canonical_json({
        "dense_sha256": _checkpoint_sha(cfg), "model": result_fields("model", asdict(cfg.model)) | {"device": None},
        "data": {"kind": cfg.data.kind, "fingerprint": base.fingerprint(), "images": len(test)},
        "device": device.type, "precision": resolve_precision(cfg.evaluate.precision, device),
        "torch": torch.__version__}))
    path = cache_root() / "dense-predictions" / f"{key[:32]}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError as exc:  # no cache folder: compute, as without a cache
        log.warning("cannot cache dense predictions in %s (%s)", path.parent, exc)
        return predict(dense, test, cfg.evaluate.batch_size, "evaluate dense", cfg.data.num_workers,
                       cfg.evaluate.precision)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # sweep points evaluating at once: one computes, the others wait and read
        if path.is_file():
            try:
                stored = load_file(str(path))
                log.info("dense predictions reused from %s", path)
                return stored["predictions"], stored["targets"]
            except (OSError, SafetensorError, KeyError) as exc:
                log.warning("ignoring unreadable cached dense predictions %s (%s)", path, exc)
        preds, targets = predict(dense, test, cfg.evaluate.batch_size, "evaluate dense", cfg.data.num_workers,
                                 cfg.evaluate.precision)
        try:
            with atomic_path(path) as tmp:
                save_file({"predictions": preds.contiguous(), "targets": targets.contiguous()}, str(tmp))
        except OSError as exc:  # a cache that cannot be written only costs the next run time
            log.warning("cannot cache dense predictions in %s (%s)", path, exc)
        return preds, targets


def score_step(cfg: PipelineConfig, checkpoint: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Top-1 of one checkpoint (dense, pruned, healed or slim, or a bitmask export) on
    `evaluate.split`, as timm's validate.py scores a model; written to `out` when given."""
    if out is not None:
        check_writable([out], [checkpoint])
    model, masks, name = stored_model(cfg, checkpoint)
    test = dataset(cfg, cfg.evaluate.split, model)
    if cfg.evaluate.max_samples is not None:
        test = Subset(test, range(min(cfg.evaluate.max_samples, len(test))))
    preds, targets = predict(model, test, cfg.evaluate.batch_size, f"evaluate {name}", cfg.data.num_workers,
                             cfg.evaluate.precision)
    layers = [key for key, mask in masks.items() if not mask.all()]
    metrics = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "model": name,
               "split": cfg.evaluate.split, "images": len(targets), "top1": float((preds == targets).float().mean()),
               "sparsity": measured_sparsity(model, layers)["total"] if layers else 0.0}
    if architecture_of(model) is not None:  # slim: the fraction of units its structure removed
        with on_meta():  # the dense twin's unit counts, without allocating it
            _, num_classes, kwargs = model_spec(checkpoint_metadata(checkpoint), checkpoint)
            dense = create_model(name, num_classes=num_classes, kwargs=kwargs)
        report = structure_report(model, dense, masks, _structure(cfg, model, dense, checkpoint))
        metrics.update(sparsity=report["removed"], structure=report["structure"])
    if out is not None:
        atomic_write_json(out, metrics)
    log.info("%s: top-1 %.4f on %d %s images", checkpoint, metrics["top1"], metrics["images"], cfg.evaluate.split)
    return metrics


def _structure(cfg: PipelineConfig, model: torch.nn.Module, dense: torch.nn.Module, path: str | Path) -> str:
    """The structure to measure a model by: a slim file's own (its architecture record), else
    `prune.structure`. A config naming another structure than the file's is refused."""
    recorded = recorded_structure(model, dense, cfg.prune.structure)
    if recorded is None:
        return cfg.prune.structure
    if cfg.prune.structured and recorded != cfg.prune.structure:
        raise StarfishError(f"{path} is slim with its {recorded} removed, but prune.structure="
                            f"{cfg.prune.structure}; set prune.structure={recorded} or leave it unstructured")
    if not cfg.prune.structured:
        log.info("%s is slim: measuring the %s it removed (its architecture record)", path, recorded)
    return recorded


def evaluate_step(cfg: PipelineConfig, pruned: str | Path, healed: str | Path, out: str | Path,
                  served: str | Path | None = None) -> dict[str, Any]:
    """Top-1 of dense, pruned and healed on `evaluate.split`; recovery, agreement and sparsity checks.
    With `served` (the quantize step's ONNX file of `healed`), that file is evaluated too, in
    onnxruntime, and `recovery` is its recovery: the gate reads what is served."""
    from starfish.formats.onnx import OnnxModel, read_metadata

    check_outputs(cfg, [out], [pruned, healed, curve_path(healed), *([served] if served else [])])
    dense = dense_model(cfg)
    check_same_dense(cfg, state_sha256(dense), pruned, healed)
    pruned_model, masks, _ = pruned_checkpoint(cfg, pruned)
    healed_model, healed_masks, _ = stored_model(cfg, healed)
    if set(healed_masks) != set(masks) or any(not torch.equal(masks[k], healed_masks[k]) for k in masks):
        raise StarfishError(f"{healed} carries different masks than {pruned}; heal that pruned checkpoint again")
    check_masks_hold(healed_model, masks)
    candidates = {"pruned": pruned_model, "healed": healed_model}
    if served is not None:
        made_from = read_metadata(served).get("checkpoint_sha256")
        if made_from != sha256_file(healed):
            raise StarfishError(f"{served} was not made from {healed} (its checkpoint_sha256 differs); run "
                                "`starfish quantize` on this healed checkpoint")
        candidates["served"] = OnnxModel(served)
    test = dataset(cfg, cfg.evaluate.split, dense)
    if cfg.evaluate.max_samples is not None:
        test = Subset(test, range(min(cfg.evaluate.max_samples, len(test))))
    metrics = compare(dense, candidates, test, cfg.evaluate.batch_size,
                      cfg.data.num_workers, cached_dense_predictions(cfg, dense, test), cfg.evaluate.precision)
    structure = _structure(cfg, healed_model, dense, healed)
    if structure != "unstructured":  # the fraction of units removed, and what the model costs against dense
        report = structure_report(healed_model, dense, masks, structure)
        sparsity = report["removed"]
        metrics.update(size_ratios(healed_model, dense))
    else:
        sparsity = measured_sparsity(healed_model, list(masks))["total"]
    metrics.update({
        "test_images": len(test),
        "recovery": metrics["served_recovery" if served is not None else "healed_recovery"],
        "sparsity": sparsity,
        "sparsity_target": cfg.prune.sparsity,
        "sparsity_drift": abs(sparsity - cfg.prune.sparsity),
    })
    if served is not None:
        metrics["quant"] = read_metadata(served).get("quant", "none")
    inputs = {"pruned_sha256": sha256_file(pruned), "healed_sha256": sha256_file(healed),
              **({"served_sha256": sha256_file(served)} if served is not None else {})}
    write_with_sidecar(out, lambda path: atomic_write_json(path, metrics), inputs=inputs)
    log.info("dense %.4f  pruned %.4f  healed %.4f%s  recovery %.4f", metrics["dense_top1"],
             metrics["pruned_top1"], metrics["healed_top1"],
             f"  served ({metrics['quant']}) {metrics['served_top1']:.4f}" if served is not None else "",
             metrics["recovery"])
    return metrics
