"""bench.paper_scale --quick on the real data of ../shared (skipped when absent): the GPU script's
whole code path (data at another input size, victim training, protect, references and tau0, every
thief, every counter-measure, the JSON and table) runs on CPU with small models and few images, in
this process (run pytest as `python -m pytest` from the repository root). Its figures mean nothing
at this size; the test checks that every stage ran and was recorded."""
from __future__ import annotations

import contextlib
import io
import json
import math

from bench import paper_scale
from honeypotnet.verify import stolen_verdict


def test_paper_scale_quick_runs_every_stage(shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    out = tmp_path / "ps"
    argv = ["--quick", "--device", "cpu", "--size", "40", "--victim-arch", "cnn_small", "--thief-arch", "cnn_small",
            "--cross-arch", "cnn", "--deadline", "100000", "--out", str(out), "--shared", str(shared_dir),
            "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = paper_scale.main(argv)
    r = json.loads((out / "results.json").read_text())
    assert r["benchmark"] == "bench.paper_scale" and r["mode"] == "quick" and r["thieves"] == res["thieves"]
    assert r["command"].startswith("python -m bench.paper_scale --quick")
    assert set(r["stages"]) == {"data", "victim", "protect", "references"}
    assert r["data"]["size"] == 40 and r["skipped"] == []
    assert r["victim"]["epochs"] == 2 and all(math.isfinite(v) for v in r["victim"]["loss"])
    assert 0 <= r["protection"]["fidelity"] <= 1 and len(r["protection"]["history"]) == 2
    assert r["protection"]["config"]["version"] == 2 and r["protection"]["preset"] == "spec"
    assert 0.05 <= r["calibration"]["tau0"] <= 0.5 and len(r["calibration"]["reference"]) == 2
    units = {(t["protection"], t["arch"], t["budget"], t["output"]) for t in r["thieves"]}
    assert units == {("protected", "cnn_small", 800, "probs"), ("clean", "cnn_small", 800, "probs"),
                     ("protected", "cnn_small", 800, "label"), ("protected", "cnn", 800, "probs"),
                     ("clean", "cnn", 800, "probs"), ("protected", "cnn_small", 400, "probs"),
                     ("protected", "cnn_small", 200, "probs"), ("clean", "cnn_small", 800, "label"),
                     ("clean", "cnn_small", 200, "probs")}
    for t in r["thieves"]:
        assert t["n"] == 180 and 0 <= t["asr"] <= 1 and t["stolen"] == stolen_verdict(t["p_value"], t.get("paired_p_value"), 1e-3)
    measures = [(m["counter_measure"], m.get("error")) for m in r["robustness"]]
    assert [m for m, _ in measures] == ["finetune"] * 4 + ["fine-prune", "jpeg", "blur"]
    assert all(e is None for _, e in measures), measures
    table = (out / "results.md").read_text()
    assert table.count("| protected |") >= 5 + 7 and (out / "trigger.png").stat().st_size > 0
    assert table in buf.getvalue()
