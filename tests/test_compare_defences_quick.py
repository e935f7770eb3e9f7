"""bench.compare_defences: HoneypotNet next to the other extraction defences, on real data.

The first tests need no data (the settings table, the reuse of a reproduction's units). The others
run `bench.compare_defences --quick` once, in this process (tiny protocol: the reproduction's pipeline
on 500 shadow / 1,000 pool images, one outer iteration, 2-epoch thieves; a smoke test of the whole
benchmark, about a minute on one CPU thread) on a subset of the settings, and check what it writes.
Skipped without ../shared. Run pytest as `python -m pytest` from the repository root.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from bench import compare_defences as script
from honeypotnet.verify import stolen_verdict

SETTINGS = ["none", "top1", "round2", "rs0.3", "madarg1.0", "am0.5", "dawn0.05", "hp", "hp+top1"]


def test_every_setting_builds_valid_defences():
    from honeypotnet.defences import make_defence
    from honeypotnet.models import create_model

    assert len({s.id for s in script.SETTINGS}) == len(script.SETTINGS)
    assert set(script.QUICK_SETTINGS) <= set(script.BY_ID)
    families = {s.family for s in script.SETTINGS}
    assert {"none", "label", "topk", "rounding", "gaussian", "reverse_sigmoid", "mad", "mad_argmax",
            "adaptive_misinformation", "dawn", "honeypot"} <= families
    assert any(s.model == "protected" and s.defences for s in script.SETTINGS)  # a composition with HoneypotNet
    dummy = create_model("cnn_small", 10)
    extra = {"mad": {"surrogate": dummy}, "mad_argmax": {"surrogate": dummy},
             "adaptive_misinformation": {"misinformation_model": dummy, "nu": 1000.0}, "dawn": {"key": "k"}}
    for s in script.SETTINGS:
        for name, params in s.defences:
            make_defence(name, **dict(params), **extra.get(name, {}))  # raises on a bad setting


@pytest.fixture(scope="module")
def quick_run(shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path_factory, missing_shared):
    if not list((shared_dir / "weights" / "resnet-cifar10").glob("resnet20-*.th")):
        missing_shared("no resnet20 weights under ../shared/weights/resnet-cifar10")
    out = tmp_path_factory.mktemp("compare") / "quick"
    argv = ["--quick", "--out", str(out), "--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root),
            "--tin-root", str(tinyimagenet_root), "--device", "cpu", "--no-progress", "--settings", *SETTINGS]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # about a minute on one idle core
        res = script.main(argv)
    assert res["benchmark"] == "bench.compare_defences"
    return out, buf.getvalue(), json.loads((out / "compare-defences.json").read_text())


@pytest.mark.slow
def test_quick_rows_cover_every_setting_and_thief(quick_run):
    _, stdout, r = quick_run
    assert r["mode"] == "quick" and r["protocol"]["budgets"] == [1000]
    rows = {(x["setting"], x["thief"]): x for x in r["rows"]}
    assert set(rows) == {(s, t) for s in SETTINGS for t in ("probs", "label")}
    for x in r["rows"]:
        assert x["queries"] == x["budget"] == 1000
        assert 0 <= x["victim_cta"] <= 1 and 0 <= x["substitute_cta"] <= 1
        assert x["honeypot_check"]["n"] == 450  # verification half: 50 per class, target class excluded
    assert "| DAWN r=5% | victim |" in stdout and "| HoneypotNet + top-1 | HoneypotNet |" in stdout
    lat = r["latency"]
    assert lat["_baseline"]["s_per_query_1"] > 0 and all(lat[s]["ratio_1"] > 0 and lat[s]["ratio_256"] > 0 for s in SETTINGS)


@pytest.mark.slow
def test_quick_label_only_answers_are_one_hot_and_argmax_defences_keep_benign_accuracy(quick_run):
    _, _, r = quick_run
    rows = {(x["setting"], x["thief"]): x for x in r["rows"]}
    assert rows[("top1", "probs")]["answers_one_hot"] and rows[("hp+top1", "probs")]["answers_one_hot"]
    assert all(x["answers_one_hot"] for x in r["rows"] if x["thief"] == "label")
    assert not rows[("none", "probs")]["answers_one_hot"] and not rows[("rs0.3", "probs")]["answers_one_hot"]
    none = rows[("none", "probs")]
    assert none["victim_cta"] == pytest.approx(r["victim"]["cta"], abs=1e-6) and none["fidelity"] == 1.0
    for s in ("top1", "rs0.3", "madarg1.0"):  # argmax-preserving: benign users see the same labels ...
        assert rows[(s, "probs")]["fidelity"] == 1.0 and rows[(s, "probs")]["victim_cta"] == none["victim_cta"]
        # ... and a label-only thief gets exactly the undefended labels: one shared substitute
        assert rows[(s, "label")]["substitute_key"] == rows[("none", "label")]["substitute_key"]
    assert rows[("rs0.3", "probs")]["answer_l1"] > 0.05 and rows[("madarg1.0", "probs")]["answer_l1"] > 0.05
    dawn = rows[("dawn0.05", "probs")]
    assert 0.85 < dawn["fidelity"] < 1.0  # about 5% of benign queries get a wrong label


@pytest.mark.slow
def test_quick_ownership_columns(quick_run):
    _, _, r = quick_run
    for x in r["rows"]:
        own = x["ownership"]
        if x["setting"].startswith("hp"):
            assert own["test"] == "honeypot" and 0 <= own["p_value"] <= 1
            assert own["null"] == pytest.approx(r["protection"]["tau0"])
            assert own["stolen"] == stolen_verdict(own["p_value"], own.get("paired_p_value"), x["honeypot_check"]["alpha"])
        elif x["setting"].startswith("dawn"):
            assert own["test"] == "dawn" and 0 <= own["p_value"] <= 1, own
            assert x["watermarks"] > 10 and x["dawn"]["n"] == x["watermarks"]
            assert own["null"] == pytest.approx(1 / 9)
            assert set(x["dawn_references"]) == {"cnn", "resnet20"}
        else:
            assert own["test"] == "n/a" and own["p_value"] is None


@pytest.mark.slow
def test_quick_writes_plot_and_table(quick_run):
    out, _, r = quick_run
    png = (out / "compare-defences.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "compare-defences.md").read_text()
    assert md.count("\n| ") == len(r["rows"]) + 1  # header separator + one line per row


def test_reuse_reproduce_copies_finished_units_and_never_overwrites_local_ones(tmp_path):
    src, dst = tmp_path / "reproduce", tmp_path / "out" / "reproduce"

    def unit(root, rel, key, files=()):
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "unit.json").write_text(json.dumps({"key": key}))
        for f in files:
            (d / f).write_text(key)
        return d

    unit(src, "victim", "v1", ["victim.safetensors"])
    unit(src, "seed0/protect-base", "p1").joinpath("work").mkdir()  # a partial work directory: not copied
    (src / "seed0/protect-base/bundle").mkdir()
    (src / "seed0/protect-base/bundle/manifest.json").write_text("{}")
    (src / "seed0/references").mkdir(parents=True)  # unfinished (no unit.json): not copied
    assert script.reuse_reproduce(src, dst, 0) == ["victim", "seed0/protect-base"]
    assert (dst / "victim/victim.safetensors").read_text() == "v1"
    assert (dst / "seed0/protect-base/bundle/manifest.json").is_file() and not (dst / "seed0/protect-base/work").exists()
    assert not (dst / "seed0/references").exists()
    assert script.reuse_reproduce(src, dst, 0) == []  # already there
    unit(src, "victim", "v2", ["victim.safetensors"])  # the source was re-run: copied again
    assert script.reuse_reproduce(src, dst, 0) == ["victim"]
    assert (dst / "victim/victim.safetensors").read_text() == "v2"
    (dst / "victim/copied_from.json").unlink()  # a unit computed here (other parameters) is never replaced
    unit(dst, "victim", "mine", ["victim.safetensors"])
    unit(src, "victim", "v3", ["victim.safetensors"])
    assert script.reuse_reproduce(src, dst, 0) == []
    assert (dst / "victim/victim.safetensors").read_text() == "mine"
    assert (src / "victim/victim.safetensors").read_text() == "v3"  # the source is never written to
