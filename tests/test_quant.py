"""INT8: the torch fake-quant scheme against onnxruntime's int8 model, layer by layer and whole;
healing through the quantizer; the quantize step and its refusals, through the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from starfish.calibration import stratified_indices
from starfish.cli import main
from starfish.config import HealConfig, PruneConfig
from starfish.datasets import load_dataset
from starfish.errors import StarfishError
from starfish.formats.onnx import export_onnx, read_metadata, run_session, session
from starfish.healing import heal_
from starfish.io import read_json, sha256_file, sidecar_path
from starfish.models import create_model
from starfish.pruning import prune, sparsify_
from starfish.quant import FakeQuant, activation_qparams, fake_weight, quantized_layers
from starfish.quant import ort as quant_ort

DEMOS = {"vit": ("starfish_vit_fmnist", "data/demo/starfish_vit_fmnist.safetensors"),
         "cnn": ("starfish_cnn_fmnist", "data/demo/starfish_cnn_fmnist.safetensors")}
CASES = [("vit", "int8-dynamic"), ("vit", "int8-static"), ("cnn", "int8-static")]
RATIO = 0.05


@pytest.fixture(scope="module")
def demo(repo_root: Path, fmnist_root: Path) -> dict:
    """Each trained demo model, its 240-image calibration split and 2,000 test images."""
    found = {}
    for family, (name, checkpoint) in DEMOS.items():
        model = create_model(name, checkpoint=repo_root / checkpoint).eval()
        train = load_dataset("fashion-mnist", fmnist_root, "train", model)
        test = load_dataset("fashion-mnist", fmnist_root, "test", model)
        split = torch.stack([train[i][0] for i in stratified_indices(train.targets, 0.004, 0)])
        found[family] = (model, split, torch.stack([test[i][0] for i in range(2000)]),
                         np.asarray(test.targets[:2000]))
    return found


def test_weights_are_int8_per_output_channel_as_hand_worked() -> None:
    weight = torch.tensor([[1.0, -0.5, 0.26], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.01]])
    # row 0: scale 1/127, row 1: all zero (scale 1), row 2: scale 2.54/127 = 0.02
    expected = torch.tensor([[127, -64, 33], [0, 0, 0], [-127, 50, 0]]) * torch.tensor([[1 / 127], [1.0], [0.02]])
    assert torch.allclose(fake_weight(weight), expected, atol=1e-6)
    # [-1, 3] as uint8: scale 4/255, zero point round(255/4) = 64; a range without 0 is widened to hold it
    assert activation_qparams(-1.0, 3.0) == pytest.approx((4 / 255, 64))
    assert activation_qparams(0.5, 2.0) == pytest.approx((2 / 255, 0))
    assert activation_qparams(0.0, 0.0) == (1.0, 0)


def test_fake_quant_gradients_pass_straight_through_and_the_model_comes_back(vit: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 28, 28)
    before = {name: module.forward for name, module in vit.named_modules()}
    with FakeQuant(vit, "int8-dynamic") as fq:
        assert set(fq.layers) == set(quantized_layers(vit, "int8-dynamic")) and "head" in fq.layers
        vit(x).sum().backward()
    grads = [p.grad for p in vit.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all("forward" not in module.__dict__ for module in vit.modules())  # every layer's own forward again
    assert {name: module.forward.__func__ for name, module in vit.named_modules()} == \
        {name: f.__func__ for name, f in before.items()}


@pytest.mark.parametrize("family, mode", CASES)
def test_each_layer_alone_fake_quant_equals_onnxruntime_int8(family: str, mode: str, demo: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheme, one layer at a time: only that layer quantized in both, the same images in.
    For every layer the int8 model is within RATIO of its own error from float of the fake-quant
    model (what is left is float noise moving a few roundings; measured at most 0.03, the demo
    CNN's last depthwise conv, where BatchNorm folded into it changes the float rounding)."""
    model, split, test, _ = demo[family]
    export_onnx(model, tmp_path / "float.onnx", tuple(split.shape[1:]), {"model": family})
    layers = quantized_layers(model, mode)
    every = quant_ort.weight_nodes
    with torch.no_grad():
        expected = model(test[:200]).numpy()
    ratios = {}
    for index, layer in enumerate(layers):
        monkeypatch.setattr(quant_ort, "weight_nodes", lambda proto, m: every(proto, m)[index:index + 1])
        quant_ort.quantize_onnx(tmp_path / "float.onnx", tmp_path / "one.onnx", mode, 1, split)
        simulation = FakeQuant(model, mode, split)
        simulation.layers = {layer: simulation.layers[layer]}
        with simulation, torch.no_grad():
            simulated = model(test[:200]).numpy()
        served = run_session(session(tmp_path / "one.onnx"), test[:200])
        ratios[layer] = np.abs(served - simulated).mean() / np.abs(served - expected).mean()
    print(family, mode, {k: round(float(v), 4) for k, v in ratios.items()})
    assert max(ratios.values()) <= RATIO, ratios


@pytest.mark.parametrize("family, mode", CASES)
def test_the_whole_int8_model_predicts_what_fake_quant_predicts(family: str, mode: str, demo: dict,
                                                                tmp_path: Path) -> None:
    """Through the whole network the roundings that float noise moves compound, so logits agree
    only statistically: measured here, predictions agree on at least 99% of 2,000 test images and
    top-1 within 0.5 points, and the int8 model is nearer fake-quant than float."""
    model, split, test, targets = demo[family]
    result = quant_ort.write_int8(model, tmp_path / "int8.onnx", tuple(split.shape[1:]), {"model": family}, mode,
                                  split)
    assert result["quantized_layers"] == len(quantized_layers(model, mode))
    int8 = session(tmp_path / "int8.onnx")
    served = np.concatenate([run_session(int8, test[i:i + 500]) for i in range(0, 2000, 500)])
    with torch.no_grad():  # in the same batches: a dynamic range is each call's own
        expected = model(test).numpy()
        with FakeQuant(model, mode, split):
            simulated = np.concatenate([model(test[i:i + 500]).numpy() for i in range(0, 2000, 500)])
    agreement = float((served.argmax(1) == simulated.argmax(1)).mean())
    top1 = [float((logits.argmax(1) == targets).mean()) for logits in (served, simulated)]
    assert agreement >= 0.99 and abs(top1[0] - top1[1]) <= 0.005, (agreement, top1)
    assert np.abs(served - simulated).mean() < np.abs(served - expected).mean()
    assert read_metadata(tmp_path / "int8.onnx")["quant"] == mode
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert ({"DynamicQuantizeLinear", "MatMulInteger"} if mode == "int8-dynamic" else {"QuantizeLinear"}) <= ops


def test_healing_through_the_quantizer_trains_the_fake_quant_model_and_keeps_masks(demo: dict) -> None:
    model, split, _, _ = demo["vit"]
    masks = prune(model, PruneConfig("magnitude", 0.75)).masks
    pruned = sparsify_(copy.deepcopy(model), masks)
    start = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = heal_(pruned, model, masks, split, HealConfig(steps=20, holdout_every=10, quant="int8-static"))
    assert report["steps"] == 20 and all("forward" not in m.__dict__ for m in pruned.modules())
    changed = [k for k in masks if not torch.equal(start[k], pruned.state_dict()[k])]
    assert changed and all(bool((pruned.state_dict()[k][~masks[k]] == 0).all()) for k in masks)


def _run(*args: str) -> int:
    return main(list(args))


@pytest.mark.parametrize("depth", [[], ["--set", "prune.sparsity=0.75", "--set", "prune.depth=1"]],
                         ids=["width", "a-block-removed"])
def test_quantize_through_the_cli_writes_the_served_model_and_evaluate_reads_it(
        depth: list[str], tmp_path: Path, params_path: Path, capsys: pytest.CaptureFixture) -> None:
    """From the repository's params: sample, prune (structured; also with a whole block removed),
    heal through the quantizer, quantize (int8-static), evaluate the served file in onnxruntime;
    the sidecar holds the recipe."""
    common = ["--params", str(params_path), "--set", "prune.structure=neurons+heads", "--set",
              "quant.mode=int8-static", "--set", "heal.quant=int8-static", "--set", "heal.steps=10",
              "--set", "evaluate.max_samples=500", *depth]
    split, pruned, healed, served = (tmp_path / n for n in ("split.json", "pruned.safetensors", "healed.safetensors",
                                                             "served.onnx"))
    assert _run("sample", "--out", str(split), *common) == 0
    assert _run("prune", "--calibration", str(split), "--out", str(pruned), *common) == 0
    assert _run("heal", "--pruned", str(pruned), "--calibration", str(split), "--out", str(healed), *common) == 0
    capsys.readouterr()
    assert _run("quantize", "--healed", str(healed), "--calibration", str(split), "--out", str(served), *common) == 0
    result = json.loads(capsys.readouterr().out)
    meta = read_json(sidecar_path(served))
    assert meta["sha256"] == sha256_file(served) == result["sha256"]
    assert meta["config"]["quant"]["mode"] == "int8-static"
    assert meta["inputs"]["healed_sha256"] == sha256_file(healed)
    assert meta["calibration_split_hash"] == read_json(split)["content_sha256"] == \
        read_metadata(served)["calibration_split_hash"]
    assert meta["check"]["fake_quant_mean_abs_difference"] <= quant_ort.AGREEMENT * meta["check"]["int8_mean_abs_error"]
    metrics_path = tmp_path / "metrics.json"
    assert _run("evaluate", "--pruned", str(pruned), "--healed", str(healed), "--served", str(served),
                "--out", str(metrics_path), *common) == 0
    metrics = read_json(metrics_path)
    # 10 heal steps: magnitude at 75% with a block gone keeps about a third of dense
    assert metrics["quant"] == "int8-static" and metrics["recovery"] == metrics["served_recovery"] > \
        (0.2 if depth else 0.5)
    assert abs(metrics["served_top1"] - metrics["healed_top1"]) < 0.05

    # the slim files know their structure: evaluate measures it without prune.structure, refuses another one
    removed = 0.75 if depth else 0.5
    plain = [*common, "--set", "prune.structure=unstructured", "--set", "prune.depth=0"]
    assert _run("evaluate", "--pruned", str(pruned), "--healed", str(healed), "--out", str(tmp_path / "plain.json"),
                *plain) == 0
    plain_metrics = read_json(tmp_path / "plain.json")
    assert plain_metrics["sparsity"] == pytest.approx(removed) and plain_metrics["sparsity_drift"] == \
        pytest.approx(abs(removed - read_json(sidecar_path(pruned))["config"]["prune"]["sparsity"]))
    capsys.readouterr()
    assert _run("evaluate", "--checkpoint", str(healed), *plain) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(removed)
    assert _run("evaluate", "--pruned", str(pruned), "--healed", str(healed), "--out", str(tmp_path / "no.json"),
                *common, "--set", "prune.structure=heads") == 2
    assert "is slim with its neurons+heads removed, but prune.structure=heads" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()

    # a served file of another healed checkpoint is refused, and nothing is written
    other = tmp_path / "other.onnx"
    export_onnx(create_model("starfish_vit_fmnist").eval(), other, (1, 28, 28),
                {"model": "starfish_vit_fmnist", "checkpoint_sha256": "0" * 64})
    capsys.readouterr()
    assert _run("evaluate", "--pruned", str(pruned), "--healed", str(healed), "--served", str(other),
                "--out", str(tmp_path / "bad.json"), *common) == 2
    assert "was not made from" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("override, message", [
    ("quant.mode=int4", "quant.mode='int4': use one of ['none', 'int8-dynamic', 'int8-static']"),
    ("heal.quant=int8-dynamic", "heal.quant=int8-dynamic but quant.mode=none"),
])
def test_bad_quant_settings_are_one_line_and_exit_2(override: str, message: str, tmp_path: Path,
                                                    params_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run("config", "--params", str(params_path), "--set", override) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_runtime_without_int8_kernels_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    class NoInt8Session:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Could not find an implementation for MatMulInteger(10) node with name ''")

    monkeypatch.setattr(onnxruntime, "InferenceSession", NoInt8Session)
    with pytest.raises(StarfishError, match=r"cannot run int8 models \(Could not find an implementation for "
                                            r"MatMulInteger.*install onnxruntime's CPU build or set quant.mode=none"):
        quant_ort.check_int8_kernels()


def test_a_model_the_exporter_cannot_trace_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    from test_onnx import DataDependent

    out = tmp_path / "odd.onnx"
    with pytest.raises(StarfishError, match="cannot export odd to ONNX: torch's exporter could not trace it"):
        quant_ort.write_int8(DataDependent(), out, (1, 2, 2), {"model": "odd"}, "int8-dynamic",
                             torch.randn(8, 1, 2, 2))
    assert list(tmp_path.iterdir()) == []
