"""Hostile or damaged checkpoints and exports: one line, exit 2, nothing written, nothing big allocated.

Each case edits a real file the way a careless or hostile user could, then reads it through the
command line (`starfish export` reads it as heal, evaluate, register and serving do). The generated
table of `hostile.py` mutates every field of both formats; the cases here name their error."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import hostile
import pytest
import torch
from hostile import Edit

from starfish.cli import main
from starfish.errors import StarfishError
from starfish.models import create_model, load_checkpoint, state_sha256
from starfish.serving import CHECKPOINT, StarfishModel

FC1 = hostile.WEIGHT


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pruned checkpoint and its compressed export, written by starfish."""
    return hostile.sources(tmp_path_factory.mktemp("untrusted"))


def refused(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line every reading command gives for `path`, the process growing by less
    than 300 MB (a bomb that got through would allocate gigabytes); nothing is written. The
    served model refuses to load it too."""
    lines = []
    for command, args in hostile.readers(path, tmp_path / "out").items():
        code, _, grown_mb = hostile.measured(args)
        assert code == 2, command
        assert grown_mb < 300, f"{command}: the process grew by {grown_mb:.0f} MB"
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " INFO " not in line]
        assert len(err) == 1 and err[0].startswith("starfish: error:"), (command, err)
        assert not (tmp_path / "out").exists(), command
        lines.append(err[0])
    assert len(set(lines)) == 1, lines  # the same reader, the same words
    with pytest.raises(StarfishError, match=re.escape(lines[0].removeprefix("starfish: error: ")[:60])):
        StarfishModel().load_context(SimpleNamespace(artifacts={CHECKPOINT: str(path)}))
    return lines[0]


@pytest.mark.parametrize("name, source, edit", list(hostile.cases()), ids=[name for name, _, _ in hostile.cases()])
def test_every_hostile_file_of_the_generated_table_is_refused_by_every_reader(
        name: str, source: str, edit: Edit, files: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(hostile.write_case(files[source], tmp_path / "bad.safetensors", edit), tmp_path, capsys)


def _set(key: str, value: torch.Tensor) -> Edit:
    return lambda tensors, meta: tensors.__setitem__(key, value)


EXPORT_CASES: dict[str, tuple[Edit, str]] = {
    # the shape claims 4 million columns; the bitmask holds 64: a 4 GB dense tensor before the check
    "shape claims more columns": (_set(FC1 + ".shape", torch.tensor([256, 4_000_000])), "but .shape"),
    "float bitmask": (lambda t, m: t.__setitem__(FC1 + ".bitmask", t[FC1 + ".bitmask"].float()), "2-D uint8"),
    "bf16 bitmask": (lambda t, m: t.__setitem__(FC1 + ".bitmask", t[FC1 + ".bitmask"].bfloat16()), "2-D uint8"),
    "scalar shape": (_set(FC1 + ".shape", torch.tensor(5)), "2 to 8 int64 sizes"),
    "empty shape": (_set(FC1 + ".shape", torch.zeros(0, dtype=torch.int64)), "2 to 8 int64 sizes"),
    "zero size": (_set(FC1 + ".shape", torch.tensor([0, 64])), "below 1"),
    "2-D values": (lambda t, m: t.__setitem__(FC1 + ".compressed", t[FC1 + ".compressed"].view(1, -1)), "1-D"),
    "int values": (lambda t, m: t.__setitem__(FC1 + ".compressed", t[FC1 + ".compressed"].int()), "floating"),
    "bool values": (lambda t, m: t.__setitem__(FC1 + ".compressed", t[FC1 + ".compressed"] > 0), "floating"),
    "NaN values": (lambda t, m: t[FC1 + ".compressed"].__setitem__(0, float("nan")), "NaN or infinite"),
    "fewer values than bits": (lambda t, m: t.__setitem__(FC1 + ".compressed", t[FC1 + ".compressed"][:-1]),
                               "values are stored"),
    "missing bitmask": (lambda t, m: t.pop(FC1 + ".bitmask"), "lacks blocks.0.mlp.fc1.weight.bitmask"),
    "missing values": (lambda t, m: t.pop(FC1 + ".compressed"), "lacks blocks.0.mlp.fc1.weight.compressed"),
    "dense beside compressed": (_set(FC1, torch.zeros(256, 64)), "also stored dense"),
    "metadata is a list": (lambda t, m: [1, 2], "JSON list, not a mapping"),
    "model name is a number": (lambda t, m: {**m, "model": 5}, "which is not a string"),
    "checkpoint_path from the file": (lambda t, m: {**m, "model_kwargs": {"checkpoint_path": "/etc/passwd"}},
                                      "which starfish never passes to timm"),
    "a weight file in pretrained_cfg_overlay": (
        lambda t, m: {**m, "model_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}},
        "starfish passes only its input_size"),
    "num_classes is a string": (lambda t, m: {**m, "num_classes": "10"}, "not an integer in 1.."),
    # a 200,000 px image: the meta-device build sees the file does not hold it
    "a huge image size": (lambda t, m: {**m, "model_kwargs": {"img_size": 200_000}}, "does not match the model"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_a_damaged_export_is_one_line_before_any_allocation(case: str, files: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = EXPORT_CASES[case]
    line = refused(hostile.write_case(files["export"], tmp_path / "bad.safetensors", edit), tmp_path, capsys)
    assert expected in line, line


def _raw(source: Path, out: Path, meta: dict, **raw: str) -> Path:
    """`source` with metadata `meta`, where each field named in `raw` holds that JSON text as is:
    text json.dumps itself could not write (100,000 levels deep) or starfish never would."""
    from safetensors.torch import load_file, save_file

    text = hostile.json.dumps({**meta, **{key: f"@{key}@" for key in raw}})
    for key, value in raw.items():
        text = text.replace(f'"@{key}@"', value)
    save_file(load_file(str(source)), str(out), metadata={"starfish": text})
    return out


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return hostile.json.loads(handle.metadata()["starfish"])


METADATA_CASES: dict[str, tuple[dict, dict, str]] = {
    "metadata nested 100,000 deep": ({}, {"notes": "[" * 100_000 + "]" * 100_000}, "nests deeper than 64 levels"),
    "model_kwargs nested 5,000 deep": ({}, {"model_kwargs": '{"a": ' * 5000 + "1" + "}" * 5000},
                                       "nests deeper than 64 levels"),
    "num_classes of 5,000 digits": ({}, {"num_classes": "9" * 5000}, "an integer of 5000 digits"),
    "a billion classes": ({"num_classes": 10**9}, {}, "not an integer in 1..1,000,000"),
    "a model name of 50 million characters": ({"model": "vit" * 16_666_667}, {},
                                              "model name of 50,000,001 characters is refused"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_hostile_metadata_is_refused_before_it_is_parsed_or_matched(case: str, files: dict[str, Path],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fields, raw, expected = METADATA_CASES[case]
    bad = _raw(files["pruned"], tmp_path / "bad.safetensors", {**_meta(files["pruned"]), **fields}, **raw)
    assert expected in refused(bad, tmp_path, capsys)


def test_a_slim_checkpoint_missing_a_kept_entry_is_refused(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The architecture record's kept units must account for every narrowed tensor: without one
    group's entry, `info` and `export` would describe that group as dense."""
    from starfish.config import PruneConfig
    from starfish.models import save_checkpoint
    from starfish.pruning import prune, sparsify_
    from starfish.pruning.slim import slim_, slim_masks

    model = create_model(hostile.MODEL)
    masks = prune(model, PruneConfig("magnitude", 0.5, structure="neurons+heads")).masks
    slim_(sparsify_(model, masks), masks)
    source = tmp_path / "slim.safetensors"
    save_checkpoint(source, model, hostile.MODEL, slim_masks(model))
    meta = _meta(source)
    del meta["architecture"]["kept"]["blocks.1.mlp"]
    bad = _raw(source, tmp_path / "bad.safetensors", meta)
    assert "it keeps no units of blocks.1.mlp (dense: 256)" in refused(bad, tmp_path, capsys)


MASK_CASES: dict[str, tuple[Edit, str]] = {
    "mask of another shape": (_set("masks/" + FC1, torch.ones(3, 3, dtype=torch.bool)), "must be bool (256, 64)"),
    "mask of a parameter the model lacks": (_set("masks/blocks.9.mlp.fc1.weight", torch.ones(2, 2, dtype=torch.bool)),
                                            "has a mask for blocks.9.mlp.fc1.weight"),
    "float mask": (lambda t, m: t.__setitem__("masks/" + FC1, t["masks/" + FC1].float()), "must be bool"),
    "NaN weight": (lambda t, m: t[FC1].__setitem__((0, 0), float("inf")), "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masks_and_weights_are_checked_against_the_model(case: str, files: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = MASK_CASES[case]
    bad = hostile.write_case(files["pruned"], tmp_path / "bad.safetensors", edit)
    assert expected in refused(bad, tmp_path, capsys)
    with pytest.raises(StarfishError, match=expected.split(" (")[0]):
        load_checkpoint(bad)


def test_export_refuses_to_write_over_its_inputs_sidecar(files: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = Path(str(files["pruned"]) + ".meta.json")
    before = sidecar.read_bytes() if sidecar.exists() else None
    assert main(["export", "--checkpoint", str(files["pruned"]), "--out", str(sidecar)]) == 2
    assert "would destroy that input" in capsys.readouterr().err
    assert (sidecar.read_bytes() if sidecar.exists() else None) == before


def test_export_keeps_an_existing_file_and_names_its_format(files: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An export is kept unless --force says to write over it, and has its format's extension."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"someone's model")
    base = ["export", "--format", "onnx", "--checkpoint", str(files["pruned"])]
    assert main([*base, "--out", str(onnx)]) == 2
    assert "exists; choose another path, or pass --force" in capsys.readouterr().err
    assert onnx.read_bytes() == b"someone's model"
    assert main([*base, "--out", str(onnx), "--force"]) == 0 and onnx.read_bytes() != b"someone's model"
    for fmt, out, fix in [("onnx", "model.bin", "name it model.onnx"),
                          ("bitmask", "other.onnx", "name it other.safetensors")]:
        capsys.readouterr()
        assert main(["export", "--format", fmt, "--checkpoint", str(files["pruned"]), "--out",
                     str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fix in err[0] and not (tmp_path / out).exists()


def test_the_random_dense_model_is_the_same_in_every_step() -> None:
    """No checkpoint and no hub weights: timm's initialization under a fixed seed, whatever the
    global RNG holds, so prune and heal see one dense network."""
    torch.manual_seed(1)
    first = state_sha256(create_model("deit_tiny_patch16_224"))
    torch.manual_seed(2)
    assert state_sha256(create_model("deit_tiny_patch16_224")) == first


def test_pretrained_weights_out_of_reach_fail_in_seconds(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from starfish.io import free_port

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "starfish.cli", "sample", "--set",
                             "model.name=deit_tiny_patch16_224", "--set", "model.checkpoint=",
                             "--set", "model.pretrained=true", "--out", str(tmp_path / "calibration.json")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("starfish: error:")]
    assert "Traceback" not in result.stderr and "arning" not in result.stderr, result.stderr
    assert "not in the local Hugging Face cache" in line and "127.0.0.1 cannot be reached" in line
    assert "weights_only" not in line and not (tmp_path / "calibration.json").exists()


def test_bounded_json_counts_only_the_brackets_outside_strings() -> None:
    from starfish.io import MAX_JSON_DEPTH, UnsafeJSON, loads_bounded

    assert loads_bounded('{"a": "[[[\\\\\\"{{{", "b": [1, -12]}') == {"a": '[[[\\"{{{', "b": [1, -12]}
    assert loads_bounded("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(UnsafeJSON, match="nests deeper than 64 levels"):
        loads_bounded("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(UnsafeJSON, match="an integer of 31 digits"):
        loads_bounded("[-" + "1" * 31 + "]")
