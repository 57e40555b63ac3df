"""The `starfish` CLI end to end on real Fashion-MNIST, and its one-line errors on bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starfish.cli import main
from starfish.evaluate import check_masks_hold, measured_sparsity
from starfish.io import read_json, sha256_file, sidecar_path
from starfish.models import create_model, load_checkpoint, save_checkpoint


def base_args(params: Path, checkpoint: Path) -> list[str]:
    return ["--params", str(params), "--set", f"model.checkpoint={checkpoint}", "--set", "model.device=cpu"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("starfish: error:")]


def test_sample_prune_heal_evaluate(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    common = base_args(params_path, demo_checkpoint) + ["--set", "heal.epochs=1",
                                                        "--set", "evaluate.max_samples=1000"]
    calibration, pruned = tmp_path / "calibration.json", tmp_path / "pruned.safetensors"
    healed, metrics_path = tmp_path / "healed.safetensors", tmp_path / "metrics.json"

    assert main(["sample", *common, "--out", str(calibration)]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 240
    assert main(["prune", *common, "--calibration", str(calibration), "--out", str(pruned)]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert main(["heal", *common, "--pruned", str(pruned), "--calibration", str(calibration),
                 "--out", str(healed)]) == 0
    assert json.loads(capsys.readouterr().out)["heal_seconds"] > 0
    # a second heal of the same inputs writes the same bytes: no wall time or key order in the outputs
    again = tmp_path / "again" / "healed.safetensors"
    again.parent.mkdir()
    assert main(["heal", *common, "--pruned", str(pruned), "--calibration", str(calibration),
                 "--out", str(again)]) == 0
    capsys.readouterr()
    for first, second in ((healed, again), (sidecar_path(healed), sidecar_path(again)),
                          (tmp_path / "healed_loss.csv", again.parent / "healed_loss.csv")):
        assert first.read_bytes() == second.read_bytes(), first.name
    assert main(["evaluate", *common, "--pruned", str(pruned), "--healed", str(healed),
                 "--out", str(metrics_path)]) == 0
    printed = json.loads(capsys.readouterr().out)

    for output in (calibration, pruned, healed, metrics_path):
        assert output.is_file(), output
        meta = read_json(sidecar_path(output))
        assert meta["sha256"] == sha256_file(output) and meta["file"] == output.name
    loss_curve = tmp_path / "healed_loss.csv"
    lines = loss_curve.read_text().splitlines()
    assert lines[0] == "step,calibration_loss,holdout_loss"
    # one epoch of the 216 training images (24 held out) is 7 steps: points at step 0 and step 7
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "7"]
    assert all(value for line in lines[1:] for value in line.split(","))
    assert not list(tmp_path.glob(".*.tmp"))

    metrics = read_json(metrics_path)
    assert metrics == printed
    # the dense model's predictions were cached: a second evaluation reuses them, same metrics
    cached = list((Path(os.environ["STARFISH_CACHE_DIR"]) / "dense-predictions").glob("*.safetensors"))
    assert cached
    with caplog.at_level(logging.INFO, logger="starfish.steps"):
        assert main(["evaluate", *common, "--pruned", str(pruned), "--healed", str(healed),
                     "--out", str(tmp_path / "again" / "metrics.json")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    assert any("dense predictions reused from" in record.message for record in caplog.records)
    for key in ("dense_top1", "pruned_top1", "healed_top1", "recovery", "healed_agreement", "pruned_agreement",
                "sparsity", "sparsity_target", "sparsity_drift"):
        assert key in metrics, key
    assert metrics["dense_top1"] > 0.5  # a trained model
    assert 0 <= metrics["healed_top1"] <= 1 and 0 <= metrics["healed_agreement"] <= 1
    assert metrics["recovery"] == pytest.approx(metrics["healed_top1"] / metrics["dense_top1"])
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3) and metrics["sparsity_drift"] < 1e-3

    manifest = read_json(calibration)
    assert "targets" not in manifest and "labels" not in manifest
    pruned_model, pruned_masks, _ = load_checkpoint(pruned)
    healed_model, healed_masks, name = load_checkpoint(healed)
    assert name == "starfish_vit_fmnist"
    assert set(pruned_masks) == set(healed_masks) and len(healed_masks) == 16
    assert all(torch.equal(pruned_masks[k], healed_masks[k]) for k in pruned_masks)
    check_masks_hold(healed_model, healed_masks)
    assert measured_sparsity(healed_model, list(healed_masks))["total"] == pytest.approx(metrics["sparsity"])
    changed = [k for k, v in healed_model.state_dict().items() if not torch.equal(v, pruned_model.state_dict()[k])]
    assert changed and set(changed) <= set(healed_masks)
    heal_meta = read_json(sidecar_path(healed))
    assert heal_meta["inputs"]["pruned_sha256"] == sha256_file(pruned)
    assert heal_meta["config"]["heal"]["epochs"] == 1 and heal_meta["config"]["heal"]["steps"] is None
    assert heal_meta["report"]["steps"] == 7 and heal_meta["report"]["holdout_images"] == 24
    assert heal_meta["report"]["selected_step"] in (0, 7) and "curve" not in heal_meta["report"]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_checkpoints")
    other = root / "other.safetensors"
    save_checkpoint(other, create_model("starfish_vit_fmnist", num_classes=7), "starfish_vit_fmnist")
    truncated = root / "truncated.safetensors"
    save_checkpoint(truncated, create_model("starfish_vit_fmnist"), "starfish_vit_fmnist")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    return {"other": other, "truncated": truncated}


BAD_INPUTS = {
    "sparsity 1.0": (["--set", "prune.sparsity=1.0"], "prune.sparsity=1.0 must be in [0, 1)"),
    "sparsity -0.1": (["--set", "prune.sparsity=-0.1"], "prune.sparsity=-0.1 must be in [0, 1)"),
    "nm 4:4": (["--set", "prune.nm=4:4"], "prune.nm='4:4' needs 0 < N < M"),
    "unknown model": (["--set", "model.name=no_such_net"], "unknown model 'no_such_net'"),
    "unknown pruner": (["--set", "prune.method=bogus"], "unknown pruner 'bogus'"),
    "unknown healer": (["--set", "heal.method=bogus"], "unknown healer 'bogus'"),
    "missing dataset root": (["--set", "data.root=/nonexistent/fmnist"],
                             "`apt-get install dataset-fashion-mnist`"),
    "zero calibration images": (["--set", "calibration.fraction=1e-6"], "calibration.fraction=1e-06"),
    "mismatched checkpoint": (["--set", "model.checkpoint={other}"], "does not match the model"),
    "truncated checkpoint": (["--set", "model.checkpoint={truncated}"], "damaged or truncated"),
    "unknown params field": (["--set", "prune.bogus=1"], "prune: unknown field(s) ['bogus']"),
    "non-numeric value": (["--set", "heal.epochs=abc"], "heal.epochs='abc' must be a number"),
    "zero heal steps": (["--set", "heal.steps=0"], "heal.steps=0 must be >= 1"),
    "steps and epochs": (["--set", "heal.steps=100", "--set", "heal.epochs=3"], "set exactly one budget"),
    "hold-out too large": (["--set", "heal.holdout=0.5"], "heal.holdout=0.5 must be in [0, 0.5)"),
    "unknown preset": (["--set", "heal.preset=quick"], "heal.preset='quick': use one of"),
    "unknown scope preset": (["--set", "prune.scope=qkv_fc"], "prune.scope='qkv_fc' is neither a preset"),
    "unknown structure": (["--set", "prune.structure=rows"], "prune.structure='rows': use unstructured, or one"),
    "N:M with a structure": (["--set", "prune.method=nm", "--set", "prune.structure=heads"],
                             "prune.method='nm' prunes single weights; prune.structure='heads' takes"),
    "no units removed": (["--set", "prune.structure=neurons+heads", "--set", "prune.sparsity=0"],
                         "prune.sparsity=0 with prune.structure=neurons+heads removes no units"),
    "every unit removed": (["--set", "prune.structure=heads", "--set", "prune.sparsity=1.0"],
                           "must be in [0, 1); e.g. 0.5 removes half the units of each layer"),
    "depth without structure": (["--set", "prune.structure=unstructured", "--set", "prune.depth=1"],
                                "prune.depth=1 removes whole transformer blocks"),
}
# Bad input only the prune step can see: it needs the model.
PRUNE_INPUTS = {
    "a structure the family does not have": (["--set", "prune.structure=channels"],
                                             "prune.structure='channels': VisionTransformer has no channels that "
                                             "can be removed (it has: heads, neurons)"),
    "a ratio that would empty a layer": (["--set", "prune.structure=heads", "--set", "prune.sparsity=0.9"],
                                         "prune.sparsity=0.9 would remove all 4 heads of blocks.0.attn; lower it"),
    "scope names nothing": (["--set", "prune.scope=blocks.*.mlp.fc9"],
                            "prune.scope pattern 'blocks.*.mlp.fc9' names no"),
    "N:M on a layer that cannot take it": (["--set", "prune.method=nm", "--set", "prune.nm=1:10", "--set",
                                            "prune.sparsity=0.9", "--set", "prune.scope=blocks.0.attn.qkv"],
                                           "prune.nm=1:10 cannot take blocks.0.attn.qkv.weight (64 inputs)"),
}
BAD_INPUTS.update(PRUNE_INPUTS)


DATA_CASES = ("missing dataset root", "zero calibration images")  # magnitude pruning reads no dataset
CASES = ([(case, "sample") for case in BAD_INPUTS if case not in PRUNE_INPUTS]
         + [(case, "prune") for case in BAD_INPUTS if case not in DATA_CASES])


@pytest.mark.parametrize("case, command", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        case: str, command: str, params_path: Path, demo_checkpoint: Path, bad_checkpoints: dict[str, Path],
        tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    overrides, message = BAD_INPUTS[case]
    overrides = [o.format(**bad_checkpoints) for o in overrides]
    out_dir = tmp_path / "out"
    out = out_dir / ("calibration.json" if command == "sample" else "pruned.safetensors")
    args = [command, *base_args(params_path, demo_checkpoint), *overrides, "--out", str(out)]
    if command == "prune":  # the cases only pruning sees get past the manifest to the model
        manifest = request.getfixturevalue("step_files")["calibration"] if case in PRUNE_INPUTS else \
            tmp_path / "calibration.json"
        args += ["--calibration", str(manifest)]
        capsys.readouterr()  # what making the fixture printed
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert captured.out == ""
    assert not out_dir.exists()


def test_a_manifest_that_is_missing_fails_cleanly(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "pruned.safetensors"
    code = main(["prune", *base_args(params_path, demo_checkpoint), "--set", "prune.method=wanda",
                 "--calibration", str(tmp_path / "nope.json"), "--out", str(out)])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and "run `starfish sample` first" in lines[0]
    assert not out.parent.exists()


@pytest.fixture(scope="module")
def step_files(tmp_path_factory: pytest.TempPathFactory, params_path: Path, demo_checkpoint: Path) -> dict[str, Path]:
    """A real manifest, pruned and healed checkpoint, made once (two heal steps)."""
    folder = tmp_path_factory.mktemp("steps")
    common = base_args(params_path, demo_checkpoint) + ["--set", "heal.steps=2", "--set", "evaluate.max_samples=100"]
    files = {"calibration": folder / "calibration.json", "pruned": folder / "pruned.safetensors",
             "healed": folder / "healed.safetensors"}
    assert main(["sample", *common, "--out", str(files["calibration"])]) == 0
    assert main(["prune", *common, "--calibration", str(files["calibration"]), "--out", str(files["pruned"])]) == 0
    assert main(["heal", *common, "--pruned", str(files["pruned"]), "--calibration", str(files["calibration"]),
                 "--out", str(files["healed"])]) == 0
    return files


@pytest.mark.parametrize("method", ["wanda", "contribution", "torch-pruning"])
def test_the_structured_pruners_that_read_the_split_prune_from_the_command_line(
        method: str, step_files: dict[str, Path], params_path: Path, demo_checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each reads the calibration images the manifest names (torch-pruning was refused for lack of them)."""
    out = tmp_path / "slim.safetensors"
    assert main(["prune", *base_args(params_path, demo_checkpoint), "--set", f"prune.method={method}",
                 "--set", "prune.structure=neurons+heads", "--calibration", str(step_files["calibration"]),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["structure"]["removed"] == 0.5 and printed["structure"]["flops_ratio"] < 0.7
    assert read_json(sidecar_path(out))["config"]["prune"]["method"] == method


def test_the_warm_start_and_cache_fields_reach_the_heal_from_the_command_line(
        step_files: dict[str, Path], params_path: Path, demo_checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """`fast` with its statistics capped and float64 solves, `heal.cache=auto` on a 4-step heal:
    the sidecar reports the images the statistics used and no fallback, and auto recomputes
    (4 batches and the held-out checks read fewer images than caching all 240 would)."""
    out = tmp_path / "healed.safetensors"
    caplog.set_level(logging.INFO, logger="starfish")
    assert main(["heal", *base_args(params_path, demo_checkpoint), "--set", "heal.preset=fast", "--set", "heal.steps=4",
                 "--set", "heal.statistics_images=16", "--set", "heal.solve_dtype=float64", "--set", "heal.cache=auto",
                 "--pruned", str(step_files["pruned"]), "--calibration", str(step_files["calibration"]),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    meta = read_json(sidecar_path(out))
    assert meta["config"]["heal"]["statistics_images"] == 16 and meta["config"]["heal"]["solve_dtype"] == "float64"
    assert meta["report"]["warm_start"] == "layerwise"
    assert meta["report"]["statistics_images"] == 16 and meta["report"]["float64_fallbacks"] == []
    estimated = [r.getMessage() for r in caplog.records  # the alignment's choice (the warm start keeps block inputs)
                 if r.getMessage().startswith("heal.cache=auto") and "estimated seconds" in r.getMessage()]
    assert len(estimated) == 1 and estimated[0].endswith(": recompute"), estimated


OUT_IS_AN_INPUT = {
    "evaluate --out healed": ("evaluate", "healed"),
    "evaluate --out pruned": ("evaluate", "pruned"),
    "prune --out manifest": ("prune", "calibration"),
    "heal --out pruned": ("heal", "pruned"),
    "heal --out manifest": ("heal", "calibration"),
    "sample --out dense checkpoint": ("sample", "dense"),
}


@pytest.mark.parametrize("case", list(OUT_IS_AN_INPUT))
def test_an_output_that_is_an_input_is_refused_before_any_work(
        case: str, step_files: dict[str, Path], params_path: Path, demo_checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    command, victim = OUT_IS_AN_INPUT[case]
    dense = tmp_path / "dense.safetensors"
    dense.write_bytes(demo_checkpoint.read_bytes())
    paths = {**step_files, "dense": dense}
    inputs = {"sample": [], "prune": ["--calibration", str(paths["calibration"])],
              "heal": ["--pruned", str(paths["pruned"]), "--calibration", str(paths["calibration"])],
              "evaluate": ["--pruned", str(paths["pruned"]), "--healed", str(paths["healed"])]}[command]
    out = paths[victim]
    before = {name: path.read_bytes() for name, path in paths.items()}
    before_meta = sidecar_path(step_files["calibration"]).read_bytes()
    args = [command, *base_args(params_path, dense), *inputs, "--out", str(out)]
    assert main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "would destroy that input" in lines[0], lines
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    assert sidecar_path(step_files["calibration"]).read_bytes() == before_meta


def test_an_unwritable_output_folder_is_refused_before_any_work(step_files: dict[str, Path], params_path: Path,
                                                                demo_checkpoint: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = step_files["calibration"] / "healed.safetensors"  # a file, used as a folder
    args = ["heal", *base_args(params_path, demo_checkpoint), "--pruned", str(step_files["pruned"]),
            "--calibration", str(step_files["calibration"]), "--out", str(out)]
    assert main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is not a writable folder" in lines[0]


def test_the_dense_checkpoint_as_pruned_input_fails_cleanly(step_files: dict[str, Path], params_path: Path,
                                                           demo_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for command, extra in (("heal", ["--calibration", str(step_files["calibration"])]),
                           ("evaluate", ["--healed", str(step_files["healed"])])):
        out = tmp_path / command / "out.file"
        assert main([command, *base_args(params_path, demo_checkpoint), "--pruned", str(demo_checkpoint), *extra,
                     "--out", str(out)]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "not a pruned checkpoint" in lines[0]
        assert not out.parent.exists()


@pytest.mark.parametrize("command", ["heal", "evaluate"])
def test_a_pruned_checkpoint_from_another_dense_model_is_refused(command: str, step_files: dict[str, Path],
                                                                  params_path: Path, demo_checkpoint: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The pruned checkpoint records the hash of the dense weights and the timm kwargs it came
    from: heal must align to that network, and evaluate must measure recovery against it."""
    inputs = {"heal": ["--calibration", str(step_files["calibration"])],
              "evaluate": ["--healed", str(step_files["healed"])]}[command]
    for extra, expected in ((["model.checkpoint="], "was pruned from other dense weights"),  # timm's random init
                            (["model.kwargs.drop_path_rate=0.1"], "was pruned with model.kwargs={}")):
        out = tmp_path / command / "out.file"
        assert main([command, *base_args(params_path, demo_checkpoint), *(f"--set={item}" for item in extra),
                     "--pruned", str(step_files["pruned"]), *inputs, "--out", str(out)]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and expected in lines[0], lines
        assert not out.parent.exists()


MALFORMED_MANIFESTS = {
    "invalid JSON": ("{not json", "is not valid JSON"),
    "a list": ("[1, 2]", "holds a list, not a manifest"),
    "no ids": ('{"content_sha256": "x", "num_samples": 0}', "has no list of sample ids"),
    "empty ids": ('{"ids": [], "content_sha256": "x", "num_samples": 0}', "has no list of sample ids"),
    "no hash": ('{"ids": ["train/0"], "num_samples": 1}', "lacks its content hash"),
}


@pytest.mark.parametrize("case", list(MALFORMED_MANIFESTS))
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_a_malformed_manifest_fails_cleanly_for_every_pruner(
        case: str, method: str, params_path: Path, demo_checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    text, message = MALFORMED_MANIFESTS[case]
    manifest = tmp_path / "calibration.json"
    manifest.write_text(text)
    out = tmp_path / "out" / "pruned.safetensors"
    code = main(["prune", *base_args(params_path, demo_checkpoint), "--set", f"prune.method={method}",
                 "--calibration", str(manifest), "--out", str(out)])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 2 and len(lines) == 1 and message in lines[0] and "starfish sample" in lines[0], captured.err
    assert not out.parent.exists()


def test_console_script_exit_status_across_a_process(params_path: Path, demo_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "starfish"
    assert script.is_file(), f"{script} is not installed; run `pip install -e .`"
    out = tmp_path / "pruned.safetensors"
    result = subprocess.run(
        [str(script), "prune", *base_args(params_path, demo_checkpoint), "--set", "prune.sparsity=1.5",
         "--calibration", str(tmp_path / "calibration.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "prune.sparsity=1.5 must be in [0, 1)" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_demo_with_n_of_m_and_warm_started_starfish(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", *base_args(params_path, demo_checkpoint), "--set", "prune.method=nm", "--set", "prune.nm=1:4",
            "--set", "prune.sparsity=0.75", "--set", "heal.warm_start=layerwise", "--set", "heal.epochs=1",
            "--set", "evaluate.max_samples=500", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "recovery" in capsys.readouterr().out
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["sparsity"] == pytest.approx(0.75) and metrics["sparsity_target"] == 0.75
    healed, masks, _ = load_checkpoint(tmp_path / "healed.safetensors")
    check_masks_hold(healed, masks)
    for name, keep in masks.items():
        assert bool((keep.reshape(-1, 4).sum(dim=1) == 1).all()), name
    assert read_json(sidecar_path(tmp_path / "healed.safetensors"))["report"]["warm_start"] == "layerwise"


def test_list_names_the_registered_pruners_and_healers(capsys: pytest.CaptureFixture[str]) -> None:
    from starfish.catalog import HEALERS, PRUNERS
    from starfish.recipes import PRESETS, RECIPES

    assert main(["list"]) == 0
    sections = {}
    for block in re.split(r"\n(?=\S)", capsys.readouterr().out.strip()):  # a title line, then indented names
        title, *names = block.splitlines()
        sections[title.split(" (")[0]] = [name.split()[0] for name in names]
    assert sections["pruners"] == ["contribution", "magnitude", "nm", "torch-pruning", "wanda"] == PRUNERS.names()
    assert sections["healers"] == ["bias-correction", "layerwise", "logit-kd", "none", "starfish"] == HEALERS.names()
    assert sections["heal presets"] == list(PRESETS) == ["default", "faithful", "recommended", "fast"]
    assert sorted(sections["heal presets"] + sections["heal recipes over a preset"]) == RECIPES.names()
    assert "qkv_out_mlp" in sections["prune scopes"]
    assert main(["list", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert {title.split(" (")[0]: sorted(entries) for title, entries in described.items()} == \
        {title: sorted(names) for title, names in sections.items()}
    assert all(text.strip() for entries in described.values() for text in entries.values())
    for command in ("prune", "heal", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "`starfish list` names the pruners" in capsys.readouterr().out.replace("\n", " ")


def test_version_and_verbose_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"starfish {version('starfish')}"
    from starfish.cli import build_parser

    assert build_parser().parse_args(["config", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "config"]).verbose is True
    assert build_parser().parse_args(["config"]).verbose is False


def test_info_names_the_model_masks_structure_and_sidecar(step_files: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from starfish.config import PruneConfig
    from starfish.pruning import prune, sparsify_
    from starfish.pruning.slim import slim_, slim_masks

    assert main(["info", "--json", str(step_files["pruned"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "starfish_vit_fmnist" and info["format"] == "checkpoint" and not info["slim"]
    assert info["sparsity"] == pytest.approx(0.5) and len(info["masked_layers"]) == 16
    assert info["sidecar"]["matches"] and info["dense_state_sha256"]
    assert main(["info", str(step_files["pruned"])]) == 0
    text = capsys.readouterr().out
    assert "masks on 16 layers, sparsity 0.5000" in text and "sidecar" in text and "matches" in text

    model = create_model("starfish_vit_fmnist")
    masks = prune(model, PruneConfig("magnitude", 0.5, structure="neurons+heads")).masks
    slim_(sparsify_(model, masks), masks)
    slim = tmp_path / "slim.safetensors"
    save_checkpoint(slim, model, "starfish_vit_fmnist", masks=slim_masks(model))
    assert main(["info", "--json", str(slim)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["slim"] and info["masked_layers"] == {} and "sidecar" not in info
    assert info["narrowed"]["blocks.0.mlp"] == {"structure": "neurons", "kept": 128, "of": 256}
    assert info["narrowed"]["blocks.0.attn"] == {"structure": "heads", "kept": 2, "of": 4}

    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    assert main(["info", str(tmp_path / "notes.safetensors")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is damaged or truncated" in lines[0]


def test_evaluate_scores_one_checkpoint(step_files: dict[str, Path], params_path: Path, demo_checkpoint: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [*base_args(params_path, demo_checkpoint), "--set", "evaluate.max_samples=200"]
    out = tmp_path / "scores" / "healed.json"
    assert main(["evaluate", *common, "--checkpoint", str(step_files["healed"]), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert read_json(out) == printed and printed["images"] == 200 and 0.5 < printed["top1"] <= 1
    assert printed["sparsity"] == pytest.approx(0.5)
    assert printed["checkpoint_sha256"] == sha256_file(step_files["healed"])
    assert main(["evaluate", *common, "--checkpoint", str(demo_checkpoint)]) == 0  # the dense model, no --out
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0.0
    for bad, message in ((["--checkpoint", str(demo_checkpoint), "--pruned", str(step_files["pruned"])], "not both"),
                         (["--pruned", str(step_files["pruned"])], "needs --pruned, --healed and --out"),
                         (["--checkpoint", str(tmp_path / "missing.safetensors")], "does not exist")):
        assert main(["evaluate", *common, *bad]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and message in lines[0], lines


def test_compress_goes_from_the_model_to_an_exported_file(params_path: Path, demo_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = [*base_args(params_path, demo_checkpoint), "--set", "heal.steps=2", "--set", "evaluate.max_samples=100"]
    out = tmp_path / "model.safetensors"
    assert main(["compress", *common, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    model, masks, name = load_checkpoint(out)  # the bitmask export, read back
    assert name == "starfish_vit_fmnist" and len(masks) == 16 and result["export"]["path"] == str(out)
    assert result["metrics"]["sparsity"] == pytest.approx(0.5) and (tmp_path / "model.safetensors.work").is_dir()

    slim = tmp_path / "slim.onnx"
    assert main(["compress", *common, "--set", "prune.structure=neurons+heads", "--workdir", str(tmp_path / "w"),
                 "--out", str(slim)]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["format"] == "onnx" and slim.is_file()

    wrong = tmp_path / "wrong" / "slim.safetensors"
    assert main(["compress", *common, "--set", "prune.structure=neurons+heads", "--out", str(wrong)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is written as .onnx" in lines[0] and not wrong.parent.exists()


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["bench", "--help"],
                                  ["prune", "--calibration", "c.json", "--out", "p.safetensors", "--bogus"]],
                         ids=["help", "prune help", "bench help", "argument error"])
def test_help_and_argument_errors_import_no_torch(argv: list[str]) -> None:
    """`starfish --help` and a mistyped argument answer before torch, timm or MLflow are imported
    (they took 5-10 s to import here): the command line parses first and imports what a step needs."""
    import subprocess
    import sys

    probe = ("import sys\nfrom starfish.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'timm', 'mlflow', 'onnxruntime') if m in sys.modules)\n"
             "print('HEAVY', heavy, file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in run.stderr, run.stderr[-500:]
    assert ("usage: starfish" in run.stdout) if "--help" in argv else ("unrecognized arguments: --bogus" in run.stderr)
