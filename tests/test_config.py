import dataclasses
from pathlib import Path

import pytest
import yaml

from ssb.config import Config, ConfigError, describe, load_config, parse_override, preset_path, read_yaml, save_config


def test_defaults_are_the_papers_settings():
    c = Config()
    assert (c.rollout.k, c.rollout.temperature, c.rollout.top_k) == (4, 0.8, 50)
    assert c.teach.temperature == 0.4
    assert (c.train.lora_r, c.train.lora_alpha) == (32, 32)
    assert set(c.train.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (c.train.temperature, c.train.learning_rate, c.train.batch_size, c.train.epochs) == (2.0, 2e-4, 4, 3.0)
    assert (c.train.kd_weight, c.train.ce_weight) == (1.0, 0.0)


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 40
    assert all(help_ for _, help_, _ in rows), [k for k, h, _ in rows if not h]


def test_yaml_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: quick\nrollout: {k: 6}\ntrain:\n  epochs: 1\n")
    c = load_config(f, ["rollout.k=8", "eval.data.limit=None", "train.target_modules=q_proj,v_proj"])
    assert c.rollout.k == 8
    assert c.train.epochs == 1.0 and isinstance(c.train.epochs, float)
    assert c.eval.data.limit is None
    assert c.train.target_modules == ["q_proj", "v_proj"]
    assert c.data.train.limit == read_yaml(preset_path("quick"))["data"]["train"]["limit"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.kk=1", "rollout.kk"),
        ("rollout.k=abc", "rollout.k"),
        ("rollout.k=0", "rollout.k"),
        ("eval.policy=foo", "eval.policy"),
        ("curate.negative=maybe", "curate.negative"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("data.train.level=4", "data.train.level"),
        ("train.max_pairs=0", "train.max_pairs"),
        ("vllm_tensor_parallel=0", "vllm_tensor_parallel"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout: {k: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)
    f.write_text("rollout: {k: 2, bogus: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*rollout\.bogus"):
        load_config(f)


def test_override_parsing():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=hello world") == {"a": "hello world"}
    assert parse_override("a=None") == {"a": None}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_saved_config_round_trips(tmp_path):
    c = load_config(None, ["rollout.k=3", "seed=7"])
    save_config(c, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == c
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rollout"]["k"] == 3


def test_both_loss_weights_zero_is_an_error():
    with pytest.raises(ConfigError, match="kd_weight"):
        load_config(None, ["train.kd_weight=0", "train.ce_weight=0"])


# run configs (experiment specs, configs/experiments/, are checked in test_experiment.py)
SHIPPED = sorted(p for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml") if p.parent.name != "experiments")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_their_templates_fit(path):
    """Every config in configs/ builds, and its hint template has the placeholders its variant needs."""
    from ssb.prompts import load_template

    cfg = load_config(path)
    assert load_template(cfg.curate.template, negative=cfg.curate.negative, order=cfg.curate.order)
    if path.parent.name == "ablations":  # an ablation changes one thing against the quick preset
        quick = load_config(preset_path("quick"))
        changed = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(quick, f.name)]
        assert len(changed) == 1, changed


def test_ablation_values():
    root = Path(__file__).parents[1] / "configs" / "ablations"
    assert load_config(root / "k2.yaml").rollout.k == 2 and load_config(root / "k8.yaml").rollout.k == 8
    assert load_config(root / "no-negative.yaml").curate.negative is False
    assert load_config(root / "wrong-first.yaml").curate.order == "wrong_first"
    assert load_config(root / "kl-t1.yaml").train.temperature == 1.0
    sft = load_config(root / "sft.yaml").train
    assert (sft.kd_weight, sft.ce_weight) == (0.0, 1.0)
    assert load_config(Path(__file__).parents[1] / "configs" / "full.yaml").data.train.limit == 256


def test_an_override_changes_only_what_it_names_and_the_preset_stays(tmp_path, monkeypatch):
    """`ssb run --set seed=1` is the quick preset with seed 1, never the paper-size defaults; a run directory's
    saved config is reused when no --config or --preset is given."""
    from ssb.cli import build_parser, resolve_config

    monkeypatch.chdir(tmp_path)
    parse = build_parser().parse_args
    quick, _, origin = resolve_config(parse(["run"]))
    seeded, run, origin1 = resolve_config(parse(["run", "--set", "seed=1"]))
    assert seeded.seed == 1 and seeded.data.train.limit == quick.data.train.limit == 96
    assert seeded.eval == quick.eval and seeded.rollout == quick.rollout
    assert "preset 'quick'" in origin and "preset 'quick'" in origin1 and "--set seed=1" in origin1
    fresh, _, _ = resolve_config(parse(["run", "--run-dir", "elsewhere", "--set", "seed=2"]))
    assert fresh.seed == 2 and fresh.data.train.limit == 96
    save_config(load_config(None, ["data.train.limit=7"]), tmp_path / "mine" / "config.yaml")
    saved, _, origin2 = resolve_config(parse(["curate", "--run-dir", "mine", "--set", "seed=3"]))
    assert saved.data.train.limit == 7 and saved.seed == 3 and "config saved in" in origin2
