"""A generated table of hostile files: every field of starfish's checkpoint and export formats
mutated in every way that makes the file invalid.

A case is (name, source, edit): `source` is "export" (the compressed bitmask format) or
"pruned" (a checkpoint with masks); `edit` changes the file's tensors in place and may return
new metadata. `tests/test_untrusted.py` runs every case through every command that reads a
file; run this module to write the table with each reader's time and memory
(`python -m tests.hostile results/hostile`)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

Edit = Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]
MODEL = "starfish_vit_fmnist"
WEIGHT = "blocks.0.mlp.fc1.weight"  # (256, 64) in the demo ViT, stored as three parts in an export
DENSE = "blocks.0.norm1.weight"  # (64,), stored as it is
BAD_DTYPES = {  # per field: every dtype it must not have
    ".shape": (torch.int32, torch.int8, torch.uint8, torch.float32, torch.float64, torch.bool),
    ".bitmask": (torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.bool),
    ".compressed": (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool),
    "dense": (torch.int32, torch.int64, torch.uint8, torch.bool),
    "mask": (torch.uint8, torch.int64, torch.float32),
}


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return lambda tensors, meta: tensors.__setitem__(key, value(tensors[key]))


def _poke(key: str, value: float) -> Edit:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return edit


def _meta(key: str, value: Any) -> Edit:
    return lambda tensors, meta: {**meta, key: value}


def _without_meta(key: str) -> Edit:
    return lambda tensors, meta: {k: v for k, v in meta.items() if k != key}


def cases() -> Iterator[tuple[str, str, Edit]]:
    """Every mutation of the table, by field."""
    shape, bits, values = WEIGHT + ".shape", WEIGHT + ".bitmask", WEIGHT + ".compressed"
    mask = "masks/" + WEIGHT
    for part, key in ((".shape", shape), (".bitmask", bits), (".compressed", values)):
        for dtype in BAD_DTYPES[part]:
            yield f"{part} as {dtype}".replace("torch.", ""), "export", _set(key, lambda t, d=dtype: t.to(d))
        yield f"{part} missing", "export", lambda t, m, k=key: t.pop(k)
        yield f"{part} as a scalar", "export", _set(key, lambda t: t.reshape(-1)[:1].reshape(()))
        yield f"{part} with an extra axis", "export", _set(key, lambda t: t.unsqueeze(0))
    yield ".shape empty", "export", _set(shape, lambda t: t[:0])
    yield ".shape with one size", "export", _set(shape, lambda t: t[:1])
    yield ".shape with nine sizes", "export", _set(shape, lambda t: torch.ones(9, dtype=torch.int64))
    for label, sizes in (("zero rows", [0, 64]), ("negative columns", [256, -64]), ("more rows", [512, 64]),
                         ("more columns", [256, 4_000_000]), ("fewer columns", [256, 56]),
                         ("2**40 columns", [256, 2**40]), ("three axes", [256, 64, 1]), ("transposed", [64, 256])):
        yield f".shape claims {label}", "export", _set(shape, lambda t, s=sizes: torch.tensor(s))
    yield ".bitmask one row short", "export", _set(bits, lambda t: t[:-1])
    yield ".bitmask one byte short per row", "export", _set(bits, lambda t: t[:, :-1])
    yield ".bitmask one byte over per row", "export", _set(bits, lambda t: torch.cat([t, t[:, :1]], 1))
    yield ".bitmask flattened", "export", _set(bits, lambda t: t.reshape(-1))
    yield ".bitmask all set", "export", _set(bits, lambda t: torch.full_like(t, 255))
    yield ".compressed one value short", "export", _set(values, lambda t: t[:-1])
    yield ".compressed one value over", "export", _set(values, lambda t: torch.cat([t, t[:1]]))
    yield ".compressed holding NaN", "export", _poke(values, float("nan"))
    yield ".compressed holding inf", "export", _poke(values, float("inf"))
    yield "weight stored dense as well", "export", lambda t, m: t.__setitem__(WEIGHT, torch.zeros(256, 64))
    for dtype in BAD_DTYPES["dense"]:
        yield f"dense tensor as {dtype}".replace("torch.", ""), "export", _set(DENSE, lambda t, d=dtype: t.to(d))
    yield "dense tensor missing", "export", lambda t, m: t.pop(DENSE)
    yield "dense tensor of another shape", "export", _set(DENSE, lambda t: torch.cat([t, t]))
    yield "dense tensor holding NaN", "export", _poke(DENSE, float("nan"))
    yield "dense tensor holding -inf", "export", _poke(DENSE, float("-inf"))
    yield "a tensor the model lacks", "export", lambda t, m: t.__setitem__("blocks.9.norm1.weight", torch.ones(64))
    for dtype in BAD_DTYPES["mask"]:
        yield f"mask as {dtype}".replace("torch.", ""), "pruned", _set(mask, lambda t, d=dtype: t.to(d))
    yield "mask of another shape", "pruned", _set(mask, lambda t: t[:-1])
    yield "mask for a parameter the model lacks", "pruned", \
        lambda t, m: t.__setitem__("masks/blocks.9.mlp.fc1.weight", torch.ones(256, 64, dtype=torch.bool))
    yield "weight holding inf", "pruned", _poke(WEIGHT, float("inf"))
    # metadata: the whole header, then each field it may carry
    yield "metadata a list", "export", lambda t, m: [m]
    yield "metadata a string", "export", lambda t, m: "starfish_vit_fmnist"
    yield "model missing", "export", _without_meta("model")
    for value in (5, None, ["starfish_vit_fmnist"], "", "no_such_model", "../../etc/passwd"):
        yield f"model {json.dumps(value)}", "export", _meta("model", value)
    for value in ("10", 0, -1, 10**9, 2.5, True):  # null is valid: the architecture's own class count
        yield f"num_classes {json.dumps(value)}", "export", _meta("num_classes", value)
    for value in ("sparse", 7, None, "dense"):
        yield f"format {json.dumps(value)}", "export", _meta("format", value)
    for value in ([1], "img_size=32", {"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg": {"file": "/x"}},
                  {"cache_dir": "/tmp"}, {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, {"img_size": 200_000},
                  {"embed_dim": 10**6}, {"depth": 64}, {"num_classes": 5}, {"no_such_argument": 1}):
        yield f"model_kwargs {json.dumps(value)}", "export", _meta("model_kwargs", value)
    for value in ("slim", [1], {"shapes": {WEIGHT: [10**9, 64]}}, {}):
        yield f"architecture {json.dumps(value)}", "export", _meta("architecture", value)


def write_case(source: Path, out: Path, edit: Edit) -> Path:
    """`source` with `edit` applied, written as a safetensors file with starfish's header key."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["starfish"])
    changed = edit(tensors, meta)
    meta = changed if isinstance(changed, (dict, list, str)) else meta  # a popped tensor is no metadata
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"starfish": json.dumps(meta)})
    return out


def readers(path: Path, out: Path) -> dict[str, list[str]]:
    """Every command that reads a checkpoint a user names, with where it would write."""
    return {"export": ["export", "--checkpoint", str(path), "--out", str(out / "model.safetensors")],
            "export onnx": ["export", "--format", "onnx", "--checkpoint", str(path), "--out", str(out / "m.onnx")],
            "info": ["info", str(path)],
            "evaluate": ["evaluate", "--set", "evaluate.max_samples=10", "--checkpoint", str(path),
                         "--out", str(out / "metrics.json")]}


def sources(folder: Path) -> dict[str, Path]:
    """A pruned checkpoint of the demo ViT (random weights) and its export, written by starfish."""
    from starfish.cli import main
    from starfish.config import PruneConfig
    from starfish.models import create_model, save_checkpoint
    from starfish.pruning import prune, sparsify_

    model = create_model(MODEL)
    masks = prune(model, PruneConfig("magnitude", 0.5)).masks
    sparsify_(model, masks)
    pruned = folder / "pruned.safetensors"
    save_checkpoint(pruned, model, MODEL, masks=masks)
    export = folder / "export.safetensors"
    assert main(["export", "--checkpoint", str(pruned), "--out", str(export)]) == 0
    return {"pruned": pruned, "export": export}


def measured(args: list[str]) -> tuple[int, float, float]:
    """Exit code, seconds and growth of the process's peak memory (MB) of one command in-process."""
    from starfish.cli import main

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    return code, seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024


def write_table(out: Path) -> None:
    """Every case through every reader: the exit code, the first words of the error, the slowest
    reader's seconds and the largest growth of peak memory (MB)."""
    import contextlib
    import io
    import logging
    import tempfile

    logging.disable(logging.INFO)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| case | exit codes | slowest s | most MB | error |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = sources(folder)
        with contextlib.redirect_stdout(io.StringIO()):
            measured(["info", str(files["export"])])  # the imports, once
        for index, (name, source, edit) in enumerate(cases()):
            path = write_case(files[source], folder / f"case{index}.safetensors", edit)
            codes, times, grown, errors = [], [], [], set()
            for command, args in readers(path, folder / f"out{index}").items():
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    code, seconds, mb = measured(args)
                codes.append(code)
                times.append(seconds)
                grown.append(mb)
                errors |= {line for line in stderr.getvalue().splitlines() if line.startswith("starfish: error:")}
            error = " / ".join(sorted(errors)).removeprefix("starfish: error: ").replace(f"{folder}/", "")
            error = error[:140].replace("|", "\\|")
            rows.append(f"| {name} | {' '.join(map(str, codes))} | {max(times):.2f} | {max(grown):.0f} | {error} |")
    (out / "table.md").write_text(
        f"{len(rows) - 2} hostile files, each read by {', '.join(readers(Path('x'), Path('x')))} "
        "(in one process, after a warm-up read; MB: growth of the peak RSS).\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    write_table(Path(sys.argv[1] if len(sys.argv) > 1 else "results/hostile"))
