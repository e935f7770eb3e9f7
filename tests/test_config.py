"""ProtectConfig: grouped fields, presets as files, --set style overrides, and a hash that keys runs."""
import json

import pytest

from honeypotnet.config import PRESET_DIR, ProtectConfig, config_fields, list_presets


def test_presets_are_files_and_the_default_is_robust():
    assert list_presets() == ["robust", "spec"] and (PRESET_DIR / "robust.toml").is_file()
    assert ProtectConfig() == ProtectConfig.preset("robust") == ProtectConfig.from_file(PRESET_DIR / "robust.toml")
    spec = ProtectConfig.preset("spec")
    changed = {k for k, *_ in config_fields() if getattr(spec, ProtectConfig.field_of(k)) != getattr(ProtectConfig(), ProtectConfig.field_of(k))}
    assert changed == {"trigger.eps", "trigger.blur", "trigger.blur_split", "thief.finetune_epochs", "negatives.weight",
                       "negatives.archs", "negatives.finetune_epochs", "negatives.noise", "negatives.per_batch",
                       "negatives.once"}
    assert spec.eps == 16 / 255 and ProtectConfig().eps == 24 / 255


def test_file_round_trip_toml_and_json(tmp_path):
    cfg = ProtectConfig.preset("spec", lam=2.5, shadow_warm_start=False, negative_archs="", seed=7)
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert ProtectConfig.from_file(tmp_path / "c.toml") == cfg == ProtectConfig.from_file(tmp_path / "c.json")
    d = cfg.to_dict()
    assert d["version"] == 2 and set(d) == {"version", "trigger", "head", "shadow", "thief", "negatives", "loop"}
    assert d["shadow"]["warm_start"] is False and d["head"]["lam"] == 2.5


def test_overrides_by_group_key_or_attribute_name():
    cfg = ProtectConfig().override(["trigger.eps=16/255", "loop.outer_iters=3", "shadow.warm_start=false", "lam=1.5"])
    assert (cfg.eps, cfg.outer_iters, cfg.shadow_warm_start, cfg.lam) == (16 / 255, 3, False, 1.5)
    assert ProtectConfig().override({"eps": 0.05}).eps == 0.05
    with pytest.raises(ValueError, match="unknown config field"):
        ProtectConfig().override(["trigger.size=3"])
    with pytest.raises(ValueError, match="must be true or false"):
        ProtectConfig().override(["shadow.warm_start=maybe"])
    with pytest.raises(ValueError, match="trigger.eps must be in"):
        ProtectConfig().override(["trigger.eps=2"])


def test_bad_files_are_refused_clearly(tmp_path):
    bad = {"version.toml": "version = 1\n", "group.toml": "[optimizer]\nlr = 1\n",
           "syntax.toml": "[trigger\n", "type.json": json.dumps({"head": {"steps": "many"}})}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name, msg in (("version.toml", "version"), ("group.toml", "unknown config group"),
                      ("syntax.toml", "not a valid TOML"), ("type.json", "head.steps must be an integer")):
        with pytest.raises(ValueError, match=msg):
            ProtectConfig.from_file(tmp_path / name)
    with pytest.raises(ValueError, match="unknown preset"):
        ProtectConfig.preset("../robust")


def test_hash_keys_everything_but_outer_iters():
    base = ProtectConfig.preset("spec")
    assert base.hash() == ProtectConfig.preset("spec").hash()
    assert base.override({"outer_iters": 20}).hash() == base.hash()
    for change in ({"eps": 0.05}, {"seed": 1}, {"negative_noise": 0.1}, {"shadow_warm_start": False}):
        assert base.override(change).hash() != base.hash(), change
    with pytest.raises(Exception):
        base.eps = 0.1  # frozen: a config is a value
