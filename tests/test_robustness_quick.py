"""bench/robustness.py --quick on the real data of ../shared (skipped when absent): the quick
reproduction's protected and clean substitutes go through every counter-measure, and each
counter-measure visibly does something (accuracy or ASR moves), is verified, and lands in the
JSON, table and plot. Reuses conftest's `reproduce_quick` (copied: its directory stays as it is)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "robustness.py"


@pytest.fixture(scope="module")
def robustness(reproduce_quick, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robustness")
    rep = tmp / "reproduce"
    shutil.copytree(reproduce_quick[0], rep)
    out = tmp / "out"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--reproduce-out", str(rep), "--out", str(out), "--shared",
           str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "robustness.json").read_text())


def test_every_counter_measure_runs_on_both_substitutes_and_is_verified(robustness):
    out, stdout, r = robustness
    sweep = r["protocol"]["sweep"]
    expected = ({"none", "neural-cleanse"} | {f"finetune-e{e}-lr{lr:g}" for e, lr in sweep["finetune"]}
                | {f"fineprune-{p:g}" for p in sweep["prune"]} | {f"purify-{n}" for n, _ in sweep["purify"]})
    for oracle in ("protected", "clean"):
        got = {row["measure"] for row in r["rows"] if row["oracle"] == oracle}
        assert got == expected, (oracle, got ^ expected)
    for row in r["rows"]:
        if row["measure"] != "neural-cleanse":
            assert 0 <= row["asr"] <= 1 and 0 <= row["cta"] <= 1 and row["stolen"] == (row["p_value"] < row["alpha"])
    assert (out / "robustness-finetune.png").stat().st_size > 5000
    assert "Thief's pick" in (out / "robustness.md").read_text()


def test_counter_measures_do_something(robustness):
    """A counter-measure that silently returned the substitute unchanged would leave CTA and ASR
    exactly where they were; each one must move at least one of them."""
    _, _, r = robustness
    rows = [row for row in r["rows"] if row["oracle"] == "protected"]
    none = next(row for row in rows if row["measure"] == "none")
    for row in rows:
        if row["measure"] in ("none", "neural-cleanse"):
            continue
        assert (row["cta"], row["asr"]) != (none["cta"], none["asr"]), row["measure"]
    nc = next(row for row in rows if row["measure"] == "neural-cleanse")
    assert len(nc["norms"]) == 10 and all(n > 0 for n in nc["norms"])
    assert nc["target_flagged"] == (0 in nc["flagged"])


def test_resume_reuses_every_unit(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root):
    out, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    cmd = [sys.executable, str(SCRIPT), "--quick", "--reproduce-out", rep, "--out", str(out), "--shared",
           str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "robustness.json").read_text())
    assert all(row["resumed"] for row in again["rows"])
    assert [(x["measure"], x.get("asr")) for x in again["rows"]] == [(x["measure"], x.get("asr")) for x in r["rows"]]
