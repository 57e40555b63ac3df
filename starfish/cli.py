"""The `starfish` command line: one subcommand per pipeline step, plus export, train, bench, demo and list.

Bad input exits with status 2 and one line on stderr naming the problem and the fix; nothing
is written in that case, since every output is written atomically at the end of its step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from starfish.errors import StarfishError, error_line

log = logging.getLogger("starfish")
DEFAULT_PARAMS = "params.yaml"
NAMES_EPILOG = "`starfish list` names the pruners, scopes, healers, heal presets and recipes."


def _config(args: argparse.Namespace):
    from starfish.params import load_config

    params = args.params
    if params is None and Path(DEFAULT_PARAMS).is_file():
        params = DEFAULT_PARAMS
    log.info("config: %s%s", params or "embedded defaults", f" with {args.set}" if args.set else "")
    return load_config(params, args.set)


def _print(result: dict) -> None:
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


def cmd_config(args: argparse.Namespace) -> None:
    from starfish.config import json_schema

    _print(json_schema() if args.schema else _config(args).to_dict())


def cmd_sample(args: argparse.Namespace) -> None:
    from starfish.steps import sample

    _print(sample(_config(args), args.out))


def cmd_prune(args: argparse.Namespace) -> None:
    from starfish.steps import prune_step

    _print(prune_step(_config(args), args.calibration, args.out))


def cmd_heal(args: argparse.Namespace) -> None:
    from starfish.steps import heal_step

    _print(heal_step(_config(args), args.pruned, args.calibration, args.out))


def cmd_quantize(args: argparse.Namespace) -> None:
    from starfish.steps import quantize_step

    _print(quantize_step(_config(args), args.healed, args.calibration, args.out))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from starfish.steps import evaluate_step, score_step

    if args.checkpoint is not None:
        if args.pruned or args.healed or args.served:
            raise StarfishError("evaluate takes --checkpoint alone, or --pruned and --healed together; not both")
        _print(score_step(_config(args), args.checkpoint, args.out))
        return
    if not (args.pruned and args.healed and args.out):
        raise StarfishError("evaluate needs --pruned, --healed and --out (or --checkpoint to score one model)")
    _print(evaluate_step(_config(args), args.pruned, args.healed, args.out, args.served))


def cmd_export(args: argparse.Namespace) -> None:
    from starfish.steps import export_step, onnx_export_step

    _print(onnx_export_step(args.checkpoint, args.out, args.force) if args.format == "onnx" else
           export_step(args.checkpoint, args.out, args.force))


def cmd_export_sizes(args: argparse.Namespace) -> None:
    from starfish.benchmarks.export_sizes import run

    for row in run(Path(args.out)):
        print(f"{row['model']} at {row['sparsity']:g}: {row['size_ratio']:.3f}x of dense, pruned weights "
              f"{100 * row['pruned_weight_over_ideal']:.2f}% over the bitmask ideal, bit-exact: {row['bit_exact']}")


def cmd_info(args: argparse.Namespace) -> None:
    from starfish.steps import checkpoint_info

    info = checkpoint_info(args.checkpoint)
    if args.json:
        _print(info)
        return
    if info["format"] == "onnx":
        print(f"{info['path']}: {info['model']} (ONNX, {info['quant']}), {info['parameters']:,} parameters, "
              f"{info['bytes']:,} bytes")
        print(f"  sha256 {info['sha256']}")
        print(f"  input {info['input']}, output {info['output']} (None: any size), opset {info['opset']}, "
              f"{info['nodes']} nodes: " + ", ".join(f"{op} {n}" for op, n in list(info["operators"].items())[:8]))
        for key, value in info["metadata"].items():
            print(f"  starfish.{key} = {value[:120]}")
        if "sidecar" in info:
            print(f"  sidecar {info['sidecar']['path']}: "
                  f"{'matches' if info['sidecar']['matches'] else 'DOES NOT match'} this file")
        return
    kind = "slim" if info["slim"] else info["format"]
    print(f"{info['path']}: {info['model']} ({kind}), {info['parameters']:,} parameters, {info['bytes']:,} bytes")
    print(f"  sha256 {info['sha256']}")
    if info["model_kwargs"] or info["num_classes"] is not None:
        print(f"  num_classes {info['num_classes']}, timm kwargs {info['model_kwargs']}")
    if info["masked_layers"]:
        print(f"  masks on {len(info['masked_layers'])} layers, sparsity {info['sparsity']:.4f}:")
        for key, layer in info["masked_layers"].items():
            print(f"    {key} {tuple(layer['shape'])}: keeps {layer['kept']:.4f}")
    for group, narrowed in info.get("narrowed", {}).items():
        print(f"  {group}: {narrowed['kept']} of {narrowed['of']} {narrowed['structure']}")
    for block, why in info.get("skipped", {}).items():
        print(f"  {block}: kept whole ({why})")
    if "sidecar" in info:
        print(f"  sidecar {info['sidecar']['path']}: {'matches' if info['sidecar']['matches'] else 'DOES NOT match'} "
              "this file")


# `starfish serve`'s flags, each over a field of params.yaml's serve section: (field, flag, type, help).
SERVE_FLAGS = (
    ("max_batch", "--max-batch", int, "most images one request may send, more: HTTP 400"),
    ("max_request_mb", "--max-request-mb", float, "most memory one request's ONNX run may take, estimated from the "
     "graph's tensors; more: HTTP 400"),
    ("deadline_s", "--deadline", float, "seconds of inference per request; an ONNX model's run is stopped there, "
     "HTTP 504"),
    ("preflight_timeout_s", "--preflight-timeout", float, "seconds the model may take to load and answer its input "
     "example before the server starts"),
    ("threads", "--threads", int, "onnxruntime threads per run, 0: one per core"),
)


def cmd_serve(args: argparse.Namespace) -> None:
    """MLflow's scoring app (what `mlflow models serve` runs) on a registered model, under uvicorn
    in this environment, its error answers one line of JSON (`serving_app`), once a preflight in a
    child process loaded it as the server will, answered its input example and matched what was
    registered, within the preflight timeout: a model that cannot serve is one line and exit 2
    here, not a server that dies or answers every request with an error. The bounds come from
    params.yaml's `serve` section; the flags win."""
    import os
    import subprocess

    from starfish.serving import DEADLINE_ENV, MAX_BATCH_ENV, MAX_REQUEST_MB_ENV, THREADS_ENV
    from starfish.serving_app import MODEL_URI_ENV
    from starfish.tracking import tracking_uri

    flags = {field: getattr(args, field) for field, *_ in SERVE_FLAGS if getattr(args, field) is not None}
    bounds = _config(args).replace(serve=flags).serve
    env = {**os.environ, MAX_BATCH_ENV: str(bounds.max_batch), DEADLINE_ENV: str(bounds.deadline_s),
           MAX_REQUEST_MB_ENV: str(bounds.max_request_mb), "MLFLOW_TRACKING_URI": tracking_uri(args.tracking_uri),
           THREADS_ENV: str(bounds.threads), MODEL_URI_ENV: args.model_uri}
    try:
        check = subprocess.run([sys.executable, "-m", "starfish.serving", "--preflight", args.model_uri], env=env,
                               capture_output=True, text=True, timeout=bounds.preflight_timeout_s)
    except subprocess.TimeoutExpired:
        raise StarfishError(f"{args.model_uri} did not load and answer its input example within "
                            f"{bounds.preflight_timeout_s:g} s; not serving it (raise --preflight-timeout or "
                            "serve.preflight_timeout_s for a model that loads slowly)") from None
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or [f"exit {check.returncode}"])[-1]
        raise StarfishError(f"{args.model_uri} cannot be served: {reason}")
    command = [sys.executable, "-m", "uvicorn", "--factory", "starfish.serving_app:app", "--host", args.host,
               "--port", str(args.port)]
    sys.stdout.flush()
    os.execve(sys.executable, command, env)


def cmd_serve_bench(args: argparse.Namespace) -> None:
    from starfish.benchmarks.serving import run

    for row in run(Path(args.out), args.clients, args.seconds, forms=tuple(args.forms),
                   threads=tuple(args.threads))["rows"]:
        good = row["classes"]["good"]
        print(f"{row['form']}, {row['threads'] or 'default'} threads: {row['requests_per_s']} requests/s, good "
              f"p50 {good['p50_ms']} ms p99 {good['p99_ms']} ms, {row['good_lost']} good lost, slow "
              f"{row['classes']['slow']['statuses']}, RSS peak {row['rss_mb_peak']} MB")


def cmd_latency(args: argparse.Namespace) -> None:
    from starfish.benchmarks.latency import run

    for row in run(Path(args.out)):
        if "pruned_ms" in row:  # a whole model: dense against slim or masked
            print(f"{row['device']} {row['runtime']} {row['model']} {row['structure']} {row['amount']:g} batch "
                  f"{row['batch']}: dense {row['dense_ms']} ms, pruned {row['pruned_ms']} ms ({row['speedup']}x)")
        else:
            print(f"{row['device']} {row['kind']} {row.get('dtype', '')} {row.get('batch', row.get('sparsity'))}: "
                  f"dense {row['dense_ms']} ms, sparse {row['sparse_ms']} ms ({row['speedup']}x)")


def _pipeline_steps(cfg, folder: Path) -> tuple[dict, dict, dict]:
    """sample, prune, heal, quantize and evaluate (the served model) into `folder`: (the heal's
    result, the quantize step's, the metrics)."""
    from starfish.steps import evaluate_step, heal_step, prune_step, quantize_step, sample

    split = folder / "calibration.json"
    sample(cfg, split)
    prune_step(cfg, split, folder / "pruned.safetensors")
    healed = heal_step(cfg, folder / "pruned.safetensors", split, folder / "healed.safetensors")
    served = quantize_step(cfg, folder / "healed.safetensors", split, folder / "served.onnx")
    return healed, served, evaluate_step(cfg, folder / "pruned.safetensors", folder / "healed.safetensors",
                                         folder / "metrics.json", folder / "served.onnx")


def cmd_demo(args: argparse.Namespace) -> None:
    cfg, out = _config(args), Path(args.out)
    healed, _, metrics = _pipeline_steps(cfg, out)
    print(f"dense top-1 {metrics['dense_top1']:.4f} | pruned {metrics['pruned_top1']:.4f} | "
          f"healed {metrics['healed_top1']:.4f} | served ({metrics['quant']}) {metrics['served_top1']:.4f} | "
          f"recovery {metrics['recovery']:.4f} | sparsity {metrics['sparsity']:.4f} | "
          f"heal {healed['heal_seconds']:.1f}s -> {out}")


def cmd_compress(args: argparse.Namespace) -> None:
    """Model to exported file in one command, without Prefect or MLflow: the library's steps in
    order, in a work folder beside the output, then the served model: the quantize step's ONNX
    file (int8, or a slim float model), or the bitmask export of a masked float model."""
    import shutil

    from starfish.io import read_json, sidecar_path, write_with_sidecar
    from starfish.steps import check_writable, export_step

    cfg, out = _config(args), Path(args.out)
    work = Path(args.workdir) if args.workdir else out.with_name(out.name + ".work")
    check_writable([out, work / "calibration.json"], [cfg.model.checkpoint])
    onnx = cfg.quant.mode != "none" or (cfg.prune.structured and cfg.prune.slim)
    wanted = ".onnx" if onnx else ".safetensors"
    if out.suffix != wanted:
        kind = ("an int8 model (quant.mode)" if cfg.quant.mode != "none" else "a slim model (structured, prune.slim)"
                if onnx else "a masked model, as the bitmask export,")
        raise StarfishError(f"--out {out}: {kind} is written as {wanted}; name the output so")
    _, served, metrics = _pipeline_steps(cfg, work)
    if onnx:  # the checked served file, with its sidecar's record
        record = {k: v for k, v in read_json(sidecar_path(served["path"])).items() if k not in ("file", "sha256")}
        write_with_sidecar(out, lambda path: shutil.copyfile(served["path"], path), **record)
        exported = {**served, "path": str(out)}
    else:
        exported = export_step(work / "healed.safetensors", out, force=True)  # compress rewrites its output
    _print({"export": exported, "metrics": metrics, "work": str(work)})


def cmd_list(args: argparse.Namespace) -> None:
    from starfish.catalog import HEALERS, PRUNERS, QUANT_SUMMARIES, SCOPE_PRESETS
    from starfish.recipes import PRESETS, RECIPES

    convs = {"dense": "convs except depthwise", "none": "no convs", "all": "every conv, depthwise too"}
    sections = {
        "pruners (prune.method)": {name: PRUNERS.summary(name) for name in PRUNERS.names()},
        "prune scopes (prune.scope, or comma-separated module-name patterns)": {
            name: f"Linear layers by role: {', '.join(sorted(roles)) or 'none'}; {convs[conv]}"
            for name, (roles, conv) in SCOPE_PRESETS.items()},
        "healers (heal.method)": {name: HEALERS.summary(name) for name in HEALERS.names()},
        "heal presets (heal.preset; starfish bench --healers)": {name: RECIPES.get(name).describe()
                                                                 for name in PRESETS},
        "heal recipes over a preset (starfish bench --healers)": {
            name: RECIPES.get(name).describe() for name in RECIPES.names() if name not in PRESETS},
        "served as (quant.mode; heal.quant heals through the same)": QUANT_SUMMARIES,
    }
    if args.json:
        _print(sections)
        return
    width = max(len(name) for entries in sections.values() for name in entries)
    for title, entries in sections.items():
        print(f"{title}:", *(f"  {name:<{width}}  {text}" for name, text in entries.items()), sep="\n")


def cmd_train(args: argparse.Namespace) -> None:
    from starfish.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, data_root=args.data_root, epochs=args.epochs, seed=args.seed,
                      lr=args.lr, warmup_epochs=args.warmup_epochs, init=args.init)
    _print(train(cfg, args.out))


def cmd_bench(args: argparse.Namespace) -> None:
    from starfish.benchmarks.bench import BenchConfig, run_bench

    bench_cfg = BenchConfig(sparsities=tuple(args.sparsities), pruners=tuple(args.pruners),
                            **({"healers": tuple(args.healers)} if args.healers else {}), seeds=tuple(args.seeds),
                            fractions=tuple(args.fractions) if args.fractions else None,
                            steps=tuple(args.steps) if args.steps else None,
                            eval_samples=args.eval_samples,
                            structures=tuple(args.structures) if args.structures else None, masked=args.masked,
                            stages=args.stages)
    run_bench(_config(args), bench_cfg, args.out)


def cmd_frontier(args: argparse.Namespace) -> None:
    from starfish.benchmarks.frontier import run

    run(_config(args), Path(args.out), tuple(args.families), tuple(args.seeds), not args.no_speed, args.eval_samples)


def cmd_scale(args: argparse.Namespace) -> None:
    from starfish.benchmarks.scale import run

    run(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starfish", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"starfish {_version()}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True)

    def step(name: str, fn, help_text: str, names: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=NAMES_EPILOG if names else None)
        p.add_argument("--params", help=f"params file (default: ./{DEFAULT_PARAMS} if present, else built-in)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one parameter, e.g. --set prune.sparsity=0.75 (repeatable)")
        p.set_defaults(fn=fn)
        return p

    p = step("config", cmd_config, "print the effective configuration (params file, heal preset, overrides) that "
             "every step would run with; runs nothing", names=True)
    p.add_argument("--schema", action="store_true",
                   help="print the JSON schema of params.yaml instead (types, choices, bounds), e.g. for an editor")
    p = step("sample", cmd_sample, "write the calibration split manifest")
    p.add_argument("--out", required=True, help="manifest path (.json)")
    p = step("prune", cmd_prune, "prune the dense model into a checkpoint with masks", names=True)
    p.add_argument("--calibration", required=True, help="calibration manifest (wanda uses its images)")
    p.add_argument("--out", required=True, help="pruned checkpoint path (.safetensors)")
    p = step("heal", cmd_heal, "heal a pruned checkpoint on the calibration split", names=True)
    p.add_argument("--pruned", required=True, help="the pruned checkpoint, e.g. out/pruned.safetensors")
    p.add_argument("--calibration", required=True, help="the calibration manifest it heals on (starfish sample)")
    p.add_argument("--out", required=True, help="healed checkpoint path (.safetensors); its loss curve goes beside it")
    p = step("quantize", cmd_quantize, "write the healed model as it is served: ONNX, int8 in onnxruntime by "
             "quant.mode (static ranges from the calibration split), checked before it is kept")
    p.add_argument("--healed", required=True, help="the healed checkpoint (starfish heal)")
    p.add_argument("--calibration", required=True, help="the calibration manifest (int8-static measures ranges on it)")
    p.add_argument("--out", required=True, help="the served model (.onnx), e.g. out/served.onnx")
    p = step("evaluate", cmd_evaluate, "top-1 of dense, pruned and healed, with recovery and sparsity; or of one "
                                       "checkpoint (--checkpoint)")
    p.add_argument("--pruned", help="the pruned checkpoint (from starfish prune)")
    p.add_argument("--healed", help="the healed checkpoint (from starfish heal)")
    p.add_argument("--served", help="the served ONNX model of --healed (starfish quantize): evaluated in "
                                    "onnxruntime, and its recovery is the one reported")
    p.add_argument("--checkpoint", help="score this one checkpoint instead, e.g. out/demo/healed.safetensors")
    p.add_argument("--out", help="metrics path (.json); optional with --checkpoint")
    p = sub.add_parser("export", help="write a checkpoint as a compressed sparse-bitmask checkpoint or as ONNX",
                       description="bitmask: starfish's own compressed layout, read back byte for byte; onnx: "
                                   "checked by onnx.checker and against torch (1e-4) before it is kept. "
                                   "e.g. starfish export --format onnx --checkpoint out/healed.safetensors "
                                   "--out out/healed.onnx")
    p.add_argument("--checkpoint", required=True, help="a pruned or healed checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="output path (.safetensors for bitmask, .onnx for onnx)")
    p.add_argument("--format", choices=("bitmask", "onnx"), default="bitmask",
                   help="bitmask: the compressed sparse-bitmask checkpoint; onnx: an ONNX model for onnxruntime, "
                        "checked against torch before it is kept")
    p.add_argument("--force", action="store_true", help="write over an existing --out")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("info", help="what a checkpoint or export holds: model, format, masks or narrowed groups, "
                                    "sidecar", description="Reads the file as every step does (checked first), "
                                                           "e.g. starfish info out/demo/pruned.safetensors")
    p.add_argument("checkpoint", help="a .safetensors (or .pth) checkpoint, or a bitmask export")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(fn=cmd_info)
    p = step("serve", cmd_serve, "serve a registered model over HTTP (MLflow's scoring app, this environment), "
             "within params.yaml's serve bounds; POST images (N, C, H, W) as {\"inputs\": ...} to /invocations for "
             "logits")
    p.add_argument("model_uri", help='e.g. "models:/starfish-starfish-vit-fmnist@champion"')
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=5001, help="port to listen on (default: 5001)")
    for field, flag, kind, text in SERVE_FLAGS:
        p.add_argument(flag, dest=field, type=kind, help=f"{text} (default: serve.{field})")
    p.add_argument("--tracking-uri", default=None, help="the registry to read the model from (default: "
                                                        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p = sub.add_parser("serve-bench", help="starfish serve under concurrent load on loopback: throughput, "
                       "latency, refusals and memory", description=("Serves the slim demo ViT in float and int8 "
                       "and sends a mix of good, malformed, too large and deadline-hitting requests "
                       "(starfish/benchmarks/serving.py)."))
    p.add_argument("--out", default="results/serving", help="results folder (default: results/serving)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of load per served form (default: 30)")
    p.add_argument("--forms", nargs="+", default=["none", "int8-static"], choices=["none", "int8-static"],
                   help="served forms: float ONNX (none) and the static int8 model")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="onnxruntime threads per run to serve "
                   "with, 0: one per core (default: 1 0)")
    p.set_defaults(fn=cmd_serve_bench)
    p = sub.add_parser("export-sizes", help="sizes of compressed exports against dense and the bitmask ideal",
                       description="Exports the demo ViT, deit_tiny and resnet18 at 50/75/90% magnitude "
                                   "sparsity and checks each round trip byte for byte.")
    p.add_argument("--out", default="results/export", help="results folder (default: results/export)")
    p.set_defaults(fn=cmd_export_sizes)
    p = sub.add_parser("latency", help="inference time of dense against sparse (CSR on a CPU, 2:4 on CUDA) and "
                       "against slim models (torch eager and onnxruntime)",
                       description="Medians of alternating dense and pruned timings on this machine; run it on a "
                                   "quiet one.")
    p.add_argument("--out", default="results/latency", help="results folder (default: results/latency)")
    p.set_defaults(fn=cmd_latency)
    p = step("demo", cmd_demo, "sample, prune, heal and evaluate the demo model in one go", names=True)
    p.add_argument("--out", default="out/demo", help="folder for the four steps' outputs (default: out/demo)")
    p = step("compress", cmd_compress, "model to exported file in one go: sample, prune, heal, evaluate, export "
                                       "(no Prefect, no MLflow)", names=True)
    p.add_argument("--out", required=True, help="the exported model: .safetensors (bitmask), or .onnx for "
                                                "prune.structure with prune.slim, e.g. out/deit.onnx")
    p.add_argument("--workdir", help="where the steps' files go (default: <out>.work beside the output)")
    p = step("bench", cmd_bench, "healers x pruners x sparsities (x calibration sizes x seeds) side by side; "
             "resumable, and several processes on one --out share the grid", names=True)
    p.add_argument("--out", default="results/bench", help="grid folder; finished cells are kept and skipped")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95],
                   help="prune.sparsity values, e.g. --sparsities 0.5 0.75")
    p.add_argument("--pruners", nargs="+", default=["magnitude", "wanda", "nm"], help="see `starfish list`")
    p.add_argument("--healers", nargs="+", default=None,
                   help="heal recipes (`starfish list`); default: the bench's standard set "
                        "(DEFAULT_HEALERS in starfish/benchmarks/bench.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed: its own split and shuffle")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="calibration fractions to sweep (default: calibration.fraction)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="step budgets to sweep, for every healer (default: heal.steps; presets keep their own)")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--structures", nargs="+", default=None,
                   help="prune.structure values to sweep, e.g. unstructured neurons+heads (default: prune.structure)")
    p.add_argument("--masked", action="store_true", help="heal structured cells masked instead of slim")
    p.add_argument("--stages", type=int, default=1, help="prune and heal in this many equal steps of sparsity, "
                                                         "the step budget split among them (default: 1, at once)")
    p = step("frontier", cmd_frontier, "recovery against speed-up for structure x int8 x heal: the demo models "
             "as served in onnxruntime, and deit_small / resnet50 timed side by side; resumable, shareable")
    p.add_argument("--out", default="results/frontier", help="results folder (default: results/frontier)")
    p.add_argument("--families", nargs="+", choices=("vit", "cnn"), default=["vit", "cnn"],
                   help="the demo ViT (neurons+heads, deit_small speed) and the demo CNN (channels, resnet50 speed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="each seed: its own split and shuffle")
    p.add_argument("--no-speed", action="store_true", help="the recovery grid only")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test images only")
    p = sub.add_parser("list", help="the pruners, healers, prune scopes, heal presets and recipes, "
                       "each with what it does", description="names that prune, heal and bench accept, e.g. "
                                                              "starfish list --json | jq '.\"healers (heal.method)\"'")
    p.add_argument("--json", action="store_true", help="print {section: {name: description}} as JSON")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("scale", help="time and memory of each stage on a DeiT and an ImageNet-layout JPEG tree; "
                       "resumable", description="Times each stage on deit_tiny and a generated ImageNet-layout "
                                                "JPEG tree on this machine, resuming where it stopped.")
    p.add_argument("--out", default="results/scale", help="results folder (default: results/scale)")
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("train", help="train a model from scratch on Fashion-MNIST (makes the demo checkpoint)")
    p.add_argument("--model", default="starfish_vit_fmnist", help="timm model name (default: the demo ViT)")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX folder")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--seed", type=int, default=0, help="initialization and shuffle seed")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine (epochs)")
    p.add_argument("--init", help="continue from this checkpoint (another cosine cycle) instead of scratch")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. data/demo/starfish_vit_fmnist.safetensors")
    p.set_defaults(fn=cmd_train)
    for command in sub.choices.values():  # -v after the subcommand too; absent, it keeps the one before
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("starfish")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (StarfishError, OSError) as exc:
        line = error_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("starfish: interrupted; no partial outputs were written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
