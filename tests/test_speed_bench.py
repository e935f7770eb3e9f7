"""bench.speed's side-by-side protect table and its --configs parsing (no timing: the script prints figures)."""
import pytest

from bench import speed


def test_configs_are_presets_with_set_style_changes():
    cfg = speed.config_of("robust:negatives.per_batch=1,trigger.passes=1", 3)
    assert cfg.negative_per_batch == 1 and cfg.trigger_passes == 1 and cfg.outer_iters == 3
    assert speed.config_of("spec", 2).negative_weight == 0
    args = speed.parse_args(["--configs", "spec", "robust", "--protect-iters", "1"])
    assert [n for n, _ in args.protect_configs] == ["spec", "robust"]
    # "@glibc" picks the allocator of the run's process, not a config field
    assert speed.config_of("robust:negatives.per_batch=1@glibc", 2) == speed.config_of("robust:negatives.per_batch=1", 2)
    assert [n for n, _ in speed.parse_args([]).protect_configs] == ["spec", "robust", "robust@cached"]
    # "@cached" reads the negative shadows the last earlier plain run of the same configuration cached
    once = "robust:negatives.once=24"
    args = speed.parse_args(["--configs", "spec", once, once + "@glibc", once + "@cached", once + "@cached@glibc"])
    assert args.cache_from == [None, None, None, 2, 2]
    assert speed.run_flags(once + "@cached@glibc") == (once, {"@cached", "@glibc"}) and speed.glibc_run(once + "@cached@glibc")
    assert speed.config_of(once + "@glibc@cached", 2) == speed.config_of(once, 2)
    for bad in (["--configs", "spec", once + "@cached"], ["--configs", "spec", "spec@cached"]):
        with pytest.raises(SystemExit):  # no run fills its cache / nothing to cache without negatives.once
            speed.parse_args(bad)
    for bad in (["--configs", "fast"], ["--configs", "robust:negatives.nope=1"], ["--configs", "robust:negatives.per_batch=-1"]):
        with pytest.raises(SystemExit):
            speed.parse_args(bad)


def test_protect_table_puts_runs_side_by_side_with_their_ratio():
    runs = [{"config": "spec", "total_s": 10.0, "steps_s": {"shadow": 4.0, "trigger": 6.0}},
            {"config": "robust", "total_s": 25.0, "steps_s": {"shadow": 4.0, "negatives": 8.0, "trigger": 13.0}}]
    md = "\n".join(speed.protect_table(runs, 1, 100, 100, "cpu"))
    assert "| step | spec | robust |" in md and "| negatives | 0.00 | 8.00 |" in md
    assert "| total (protect call) | 10.00 | 25.00 |" in md and "| × spec | 1.00× | 2.50× |" in md


def test_protect_only_times_the_protect_runs_alone(shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--protect-only runs the side-by-side protect (a fresh process per config, real data) and none of the
    before/after comparisons."""
    out = tmp_path / "speed"
    once = "spec:negatives.weight=1,negatives.archs=cnn_small,negatives.once=2,trigger.passes=1,head.steps=20"
    r = speed.main(["--quick", "--protect-only", "--protect-iters", "1", "--n", "200", "--configs", "spec", once,
                    once + "@cached", "--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root),
                    "--tin-root", str(tinyimagenet_root), "--device", "cpu", "--out", str(out)])
    assert r["rows"] == [] and [p["config"] for p in r["protect"]] == ["spec", once, once + "@cached"]
    assert r["protect"][0]["total_s"] > 0 and r["protect"][0]["shadow"] == r["protect"][0]["owner"] == 200
    # the second protection of the same configuration loads the negative shadow its first run trained
    cold, warm = r["protect"][1], r["protect"][2]
    assert cold["cache_from"] is None and warm["cache_from"] == once
    assert cold["cached_before"] == [] and len(warm["cached_before"]) == 1
    assert warm["cached_before"][0].startswith("negative-cnn_small-")
    assert "| total (protect call) |" in (out / "speed.md").read_text()
