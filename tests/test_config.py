"""Configuration: params.yaml and `--set` overrides validated once, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from starfish.config import PipelineConfig, load_config
from starfish.errors import StarfishError


def test_repository_params_load(params_path: Path) -> None:
    cfg = load_config(params_path)
    assert cfg.calibration.fraction == 0.004 and cfg.heal.method == "starfish"
    assert cfg.heal.lr == 6e-4 and cfg.heal.batch_size == 32
    assert cfg.heal.steps == 1570 and cfg.heal.epochs is None  # the authors' budget: 10 x ceil(5000 / 32)
    assert cfg.heal == load_config(None).heal  # params.yaml spells out the built-in defaults


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
    ("heal.preset=fast", "heal.preset='fast': use one of"),
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
    with pytest.raises(StarfishError, match="use the model section's own fields"):
        load_config(None, ["model.kwargs.num_classes=5"])
