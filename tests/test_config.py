"""Configuration: params.yaml and `--set` overrides validated once, errors naming the field."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from flows.common import point_config
from starfish.cli import main
from starfish.config import HealConfig, PipelineConfig, from_dict, recipe_config
from starfish.errors import StarfishError
from starfish.params import load_config, read_yaml
from starfish.recipes import PRESETS, preset_fields


def test_repository_params_load(shipped_params: Path) -> None:
    """The shipped recipe is the frontier's fastest at 0.99 of dense (docs/frontier.md): a quarter
    of the neurons and heads by contribution, recommended through int8, served as static int8."""
    cfg = load_config(shipped_params)
    assert cfg.calibration.fraction == 0.004 and cfg.heal.method == "starfish"
    assert (cfg.prune.method, cfg.prune.sparsity, cfg.prune.structure) == ("contribution", 0.25, "neurons+heads")
    assert cfg.heal == HealConfig.from_preset("recommended", quant="int8-static")
    assert cfg.quant.mode == "int8-static"
    assert cfg.heal.steps == 1570 and cfg.heal.epochs is None  # the authors' budget: 10 x ceil(5000 / 32)
    assert load_config(None).heal == HealConfig()  # the embedded defaults, without a file
    # the shipped file names the preset and the scheme alone, so a preset chosen later is never overridden
    assert list(yaml.safe_load(shipped_params.read_text())["heal"]) == ["preset", "quant"]
    assert not set(preset_fields("recommended")) & {"quant"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_from_the_repository_root_is_what_runs(
        preset: str, repo_root: Path, params_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Selected as a user selects it, with the shipped params.yaml, a preset heals with exactly its fields."""
    expected = HealConfig.from_preset(preset)
    chosen = load_config(params_path, [f"heal.preset={preset}"])
    assert chosen.heal == expected
    # written into the params file, as a DVC user edits it
    edited = yaml.safe_load(params_path.read_text())
    edited["heal"]["preset"] = preset
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    assert load_config(tmp_path / "params.yaml").heal == expected
    # the CLI, from the repository root, reads ./params.yaml as every step does (its heal.quant beside)
    monkeypatch.chdir(repo_root)
    assert main(["config", "--set", f"heal.preset={preset}"]) == 0
    assert json.loads(capsys.readouterr().out)["heal"] == asdict(HealConfig.from_preset(preset, quant="int8-static"))
    # the compress flow: its config, as a dict to its tasks and back
    assert from_dict(point_config(chosen).to_dict()).heal == expected


def test_a_field_set_beside_a_preset_wins_and_the_log_says_what_it_replaced(
        params_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="starfish.params"):
        heal = load_config(params_path, ["heal.preset=fast", "heal.keep=best"]).heal
    assert heal == HealConfig.from_preset("fast", keep="best")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("heal preset 'fast'"))
    assert "set on top: {'keep': 'best'}" in line and "replacing the preset's keep (preset: 'last')" in line


def test_sweep_variants_keep_their_presets_own_budget() -> None:
    base = load_config(None, ["heal.steps=300"]).heal
    assert recipe_config(base, "fast").steps == preset_fields("fast")["steps"]
    assert recipe_config(base, "recommended").steps == 300
    assert recipe_config(base, "fast", steps=100) == HealConfig.from_preset("fast", steps=100)


def test_yaml_is_read_as_yaml_1_2_as_dvc_writes_it(tmp_path: Path) -> None:
    assert read_yaml("a: 2:4\nb: yes\nc: 010\nd: 0x1f\ne: 1e-3\nf: 2026-12-01\ng: true\nh: -7\ni: .inf") == \
        {"a": "2:4", "b": "yes", "c": 10, "d": 31, "e": 0.001, "f": "2026-12-01", "g": True, "h": -7,
         "i": float("inf")}
    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  nm: 2:4\n  sparsity: 0.5\n")  # unquoted, as `dvc exp run -S` rewrites it
    assert load_config(params).prune.nm == "2:4"
    params.write_text("prune:\n  nm: 24\n")
    with pytest.raises(StarfishError, match="prune.nm='24' is not N:M"):
        load_config(params)


def test_the_step_budget_does_not_depend_on_the_split_size() -> None:
    cfg = load_config(None).heal
    assert cfg.total_steps(240) == cfg.total_steps(5000) == 1570
    faithful = load_config(None, ["heal.preset=faithful"]).heal
    assert faithful.total_steps(5000) == 1570 and faithful.total_steps(240) == 80  # 10 x ceil(240 / 32)


def test_a_budget_given_later_replaces_the_other(tmp_path: Path) -> None:
    assert load_config(None, ["heal.epochs=2"]).heal.steps is None
    params = tmp_path / "params.yaml"
    params.write_text("heal:\n  epochs: 3\n")
    cfg = load_config(params, ["heal.steps=40"]).heal
    assert (cfg.steps, cfg.epochs) == (40, None)
    params.write_text("heal:\n  epochs: 3\n  steps: 40\n")
    with pytest.raises(StarfishError, match="set exactly one budget"):
        load_config(params)


def test_presets_set_their_fields_and_explicit_fields_win() -> None:
    faithful = load_config(None, ["heal.preset=faithful"]).heal
    assert (faithful.steps, faithful.epochs, faithful.holdout, faithful.preset) == (None, 10, 0.0, "faithful")
    recommended = load_config(None, ["heal.preset=recommended", "heal.logit_weight=0.5"]).heal
    assert recommended.warm_start == "layerwise" and recommended.logit_weight == 0.5
    assert recommended.steps == 1570
    assert PipelineConfig().replace(heal={"preset": "faithful"}).heal == faithful
    again = PipelineConfig().replace(heal={"preset": "recommended"})
    assert again.replace(heal={"seed": 3}).heal.warm_start == "layerwise"


def test_overrides_are_typed_by_the_field() -> None:
    cfg = load_config(None, ["prune.nm=1:4", "prune.sparsity=0.75", "prune.global_ranking=true",
                             "heal.epochs=3", "model.checkpoint=null", "evaluate.max_samples="])
    assert cfg.prune.nm == "1:4"  # not YAML's base-60 integer 64
    assert cfg.prune.sparsity == 0.75 and cfg.prune.global_ranking is True
    assert cfg.heal.epochs == 3 and cfg.heal.steps is None
    assert cfg.model.checkpoint is None and cfg.evaluate.max_samples is None


@pytest.mark.parametrize("override, message", [
    ("prune.nm=3:2", "prune.nm='3:2' needs 0 < N < M"),
    ("heal.epochs=1.5", "heal.epochs=1.5 must be int"),
    ("heal.epochs=abc", "heal.epochs='abc' must be a number"),
    ("prune.global_ranking=maybe", "prune.global_ranking='maybe' must be true or false"),
    ("heal.bogus=1", "heal: unknown field(s) ['bogus']"),
    ("nosuch.field=1", "unknown section(s) ['nosuch']"),
    ("epochs=3", "must look like section.field=value"),
    ("calibration.fraction=0", "calibration.fraction=0.0 must be in (0, 1]"),
    ("heal.lr_min=1", "heal.lr_min=1.0"),
    ("data.kind=mnist", "data.kind='mnist'"),
    ("heal.steps=0", "heal.steps=0 must be >= 1"),
    ("heal.epochs=0", "heal.epochs=0 must be >= 1"),
    ("heal.holdout=0.5", "heal.holdout=0.5 must be in [0, 0.5)"),
    ("heal.holdout_every=0", "heal.holdout_every=0 must be >= 1"),
    ("heal.logit_weight=-1", "heal.logit_weight=-1.0 must be >= 0"),
    ("heal.preset=quick", "heal.preset='quick': use one of"),
    ("prune.nm=124", "prune.nm='124' is not N:M"),
    ("heal.batchnorm=eval", "heal.batchnorm='eval': use one of"),
    ("heal.solver=lu", "heal.solver='lu': use one of"),
    ("heal.holdout_every=.inf", "heal.holdout_every=inf must be a finite number"),
    ("evaluate.batch_size=.inf", "evaluate.batch_size=inf must be a finite number"),
    ("heal.lr=.inf", "heal.lr=inf must be a finite number"),
    ("heal.logit_weight=.inf", "heal.logit_weight=inf must be a finite number"),
    ("heal.temperature=.nan", "heal.temperature=nan must be a finite number"),
    ("heal.steps=[1, 2", "--set heal.steps=[1, 2: the value is not valid YAML"),
    ("model.kwargs.img_size={a", "--set model.kwargs.img_size={a: the value is not valid YAML"),
    ("prune.scope=,,,", "prune.scope"),  # text as typed, refused by the scope's own check
])
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(StarfishError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_params_file_errors(tmp_path: Path) -> None:
    with pytest.raises(StarfishError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2\n")
    with pytest.raises(StarfishError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(StarfishError, match="must hold a mapping"):
        load_config(bad)


def test_replace_revalidates() -> None:
    cfg = PipelineConfig().replace(heal={"epochs": 2})
    assert cfg.heal.epochs == 2 and cfg.heal.steps is None and cfg.heal.method == "starfish"
    with pytest.raises(StarfishError, match="prune.sparsity=1.0"):
        cfg.replace(prune={"sparsity": 1.0})


def test_model_kwargs_from_yaml_or_one_entry_at_a_time(tmp_path: Path) -> None:
    assert load_config(None, ["model.kwargs={img_size: 384, drop_path_rate: 0.1}"]).model.kwargs == \
        {"img_size": 384, "drop_path_rate": 0.1}
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  kwargs:\n    img_size: 384\n")
    assert load_config(params, ["model.kwargs.global_pool=avg"]).model.kwargs == {"img_size": 384, "global_pool": "avg"}
    with pytest.raises(StarfishError, match="must be a mapping"):
        load_config(None, ["model.kwargs=384"])
    with pytest.raises(StarfishError, match="which starfish never passes to timm"):
        load_config(None, ["model.kwargs.num_classes=5"])


def test_the_printed_schema_validates_params_files_as_the_config_does(
        params_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`starfish config --schema`, read by a JSON Schema validator (as an editor reads it): the
    shipped params.yaml passes, and a value the config refuses is refused there too."""
    import jsonschema

    monkeypatch.chdir(repo_root)
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(read_yaml((repo_root / "params.yaml").read_text()))
    for section, field, value in [("heal", "batchnorm", "eval"), ("calibration", "fraction", 0),
                                  ("heal", "holdout", 0.5), ("heal", "steps", 0), ("evaluate", "batch_size", "x")]:
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({section: {field: value}})
        with pytest.raises(StarfishError, match=f"{section}.{field}="):
            from_dict({section: {field: value}})
