"""The CLI as a user runs it: real processes, real files; tiny sizes."""
import json
import subprocess
import sys

import pytest

from honeypotnet.cli import build_parser, protect_config
from honeypotnet.honeypot import PRESETS, ProtectConfig


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "honeypotnet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_every_verb_has_help():
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"demo", "train", "protect", "extract", "verify"} <= set(verbs)
    for verb in verbs:
        r = run(verb, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, verb


def test_cli_chain_train_protect_extract_verify(tmp_path):
    victim = tmp_path / "victim.safetensors"
    r = run("train", "--data-limit", "2000", "--epochs", "5", "--batch-size", "64", "--output", str(victim))
    assert r.returncode == 0, r.stderr
    assert json.loads(victim.with_suffix(".json").read_text())["test_accuracy"] > 0.5
    bundle = tmp_path / "bundle"
    # --preset spec: each option below turns one thing on (the robust default has its own test)
    r = run("protect", str(victim), "--preset", "spec", "--shadow-limit", "800", "--owner-limit", "400", "--iters", "1",
            "--shadow-arch", "cnn_small",
            "--shadow-epochs", "1", "--honeypot-steps", "20", "--references", "cnn_small", "--reference-epochs", "1",
            "--reference-finetune", "100", "--reference-purify", "blur-1.0,jpeg-q50", "--reference-purify-max-drop", "100",
            "--negative-weight", "1", "--negative-noise", "0.1", "--trigger-blur", "0.5", "--shadow-prune", "0.5",
            "--audit-rounds", "1", "--audit-iters", "1", "--audit-epochs", "1", "--audit-threshold", "0",
            "--audit-restarts", "1", "--output", str(bundle))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert 0 < manifest["verification"]["tau0"] <= 0.5 and manifest["history"][0]["iteration"] == 1
    # --reference-finetune: the reference and its 4 fine-tuned copies calibrate the null;
    # --reference-purify: ... and each of those 5 behind a blur (σ 1) and behind JPEG q50
    plain = ["cnn_small", *(f"cnn_small+finetune-e{e}-lr{lr:g}" for e, lr in ((3, 0.01), (10, 0.01), (3, 0.05), (10, 0.05)))]
    refs = manifest["verification"]["reference"]
    assert [r["arch"] for r in refs] == plain + [f"{n}+{p}" for n in plain for p in ("blur-1.0", "jpeg-q50")]
    assert manifest["verification"]["reference_finetune"]["images"] == 100
    assert [n for n, _ in manifest["verification"]["reference_purify"]["settings"]] == ["blur-1.0", "jpeg-q50"]
    # --negative-weight: the negative shadow is trained and reported
    assert manifest["config"]["negative_weight"] == 1.0 and 0 <= manifest["history"][0]["negative_asr"] <= 1
    assert manifest["config"]["trigger_blur"] == 0.5  # --trigger-blur reaches the configuration
    assert manifest["config"]["negative_noise"] == 0.1  # and --negative-noise
    # --shadow-prune: the fine-pruned shadow copy is built and its response reported
    assert manifest["config"]["shadow_prune"] == 0.5 and 0 <= manifest["history"][0]["shadow_pruned_asr"] <= 1
    # --audit-rounds: the checks are in the manifest; a failed first check ran one more iteration
    audits = manifest["audits"]
    assert audits[0]["archs"] == ["cnn_small"] and len(manifest["history"]) == 1 + audits[0]["added"]
    assert ("audit failed" in r.stderr) == (not audits[-1]["passed"])  # the owner is told when it failed
    # --audit-restarts: a failed run is redone with seed + 1000; the kept run's audits are the manifest's
    attempts = manifest["attempts"]
    assert [a["seed"] for a in attempts] == [0, 1000][: len(attempts)] and sum(a["kept"] for a in attempts) == 1
    assert len(attempts) == 2 or attempts[0]["passed"]
    assert next(a for a in attempts if a["kept"])["max_asr"] == audits[-1]["max_asr"]
    assert ("kept seed" in r.stderr) == (not audits[-1]["passed"])
    # protecting again into the same place is refused and leaves the bundle intact
    r = run("protect", str(victim), "--shadow-limit", "100", "--iters", "0", "--references", "", "--output", str(bundle), "--work-dir", str(tmp_path / "w2"))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    sub = tmp_path / "sub.safetensors"
    r = run("extract", str(bundle), "--budget", "500", "--epochs", "1", "--output-mode", "label", "--output", str(sub))
    assert r.returncode == 0, r.stderr
    res = json.loads(sub.with_suffix(".json").read_text())
    assert res["queries"] == 500 and res["output_mode"] == "label" and 0 <= res["substitute_accuracy"] <= 1
    out = tmp_path / "verify.json"
    r = run("verify", str(bundle), str(sub), "--data-limit", "300", "--json", str(out))
    assert r.returncode == 0, r.stderr
    v = json.loads(out.read_text())
    assert v["n"] > 200 and {"asr", "tau0", "p_value", "verdict", "unstamped_rate"} <= set(v)
    assert "verdict" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "mnist", "--output", "x.safetensors"], "unknown dataset"),
    (["train", "--data", "imagefolder", "--output", "x.safetensors"], "root"),
    (["train", "--arch", "vgg99", "--data-limit", "10", "--epochs", "0", "--output", "x.safetensors"], "vgg99"),
    (["verify", "no-such-bundle", "no-such-model"], "no manifest"),
    (["protect", "missing.safetensors", "--negative-weight", "nan", "--output", "b"], "negative_weight"),
    (["protect", "missing.safetensors", "--negative-weight", "1", "--negative-archs", "cnn", "vgg99", "--output", "b"],
     "negative_archs"),
    (["protect", "missing.safetensors", "--preset", "spec", "--negative-finetune-epochs", "2", "--output", "b"],
     "negative_finetune_epochs"),
    # negatives off under the robust default, their fine-tuned copies left on: told which option
    (["protect", "missing.safetensors", "--negative-weight", "0", "--output", "b"], "negative_finetune_epochs"),
    (["protect", "missing.safetensors", "--audit-rounds", "1", "--audit-threshold", "150", "--output", "b"], "audit_threshold"),
    (["protect", "missing.safetensors", "--audit-rounds", "1", "--audit-archs", "vgg99", "--output", "b"], "audit_archs"),
    (["protect", "missing.safetensors", "--audit-restarts", "-1", "--output", "b"], "audit_restarts"),
    (["protect", "missing.safetensors", "--trigger-blur", "-1", "--output", "b"], "trigger_blur"),
    (["protect", "missing.safetensors", "--negative-weight", "1", "--negative-noise", "nan", "--output", "b"], "negative_noise"),
    (["protect", "missing.safetensors", "--shadow-prune", "1", "--output", "b"], "shadow_prune"),
    (["protect", "missing.safetensors", "--reference-purify", "blur-2", "--output", "b"], "unknown purification blur-2"),
    (["protect", "missing.safetensors", "--reference-purify", "--reference-purify-max-drop", "nan", "--output", "b"],
     "reference-purify-max-drop"),
    (["extract", "missing.safetensors", "--output", "s.safetensors"], "not found"),
    (["protect", "missing.safetensors", "--preset", "fast", "--output", "b"], "invalid choice: 'fast'"),
])
def test_cli_bad_input_gives_one_clear_error(tmp_path, args, message):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr.lower() and "Traceback" not in r.stderr


def test_cli_protect_default_is_the_robust_configuration(tmp_path):
    """`protect` with no --preset runs the robust configuration end to end (on a toy size): the bundle
    records it, and every model it adds to the loop is trained and reported each iteration: the CNN and
    ResNet-20 negative shadows and their fine-tuned copies (the shadow's fine-tuned copy is in the
    trigger step; it needs the owner images, which `protect` always has)."""
    victim = tmp_path / "victim.safetensors"
    r = run("train", "--data-limit", "600", "--epochs", "1", "--batch-size", "64", "--output", str(victim))
    assert r.returncode == 0, r.stderr
    bundle = tmp_path / "bundle"
    r = run("protect", str(victim), "--shadow-limit", "300", "--owner-limit", "200", "--iters", "1", "--shadow-arch",
            "cnn_small", "--shadow-epochs", "1", "--honeypot-steps", "5", "--trigger-passes", "1", "--references", "",
            "--output", str(bundle))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    c = manifest["config"]
    assert c["preset"] == "robust" and c["eps_255"] == 24
    assert {k: c[k] for k in PRESETS["robust"]} == PRESETS["robust"]
    (rec,) = manifest["history"]
    for key in ("negative_asr", "negative1_resnet20_asr", "negative_ft_asr", "negative1_resnet20_ft_asr"):
        assert 0 <= rec[key] <= 1, key


def test_protect_preset_fills_only_the_options_not_given():
    """--preset sets its fields where the option was not given; a given option wins, even one equal to
    the other preset's value; without --preset the CLI builds the library's default config (robust)."""
    def cfg(*extra):
        return protect_config(build_parser().parse_args(["protect", "v.safetensors", "--output", "b", *extra]))

    robust = cfg()
    assert robust == cfg("--preset", "robust") == ProtectConfig() == ProtectConfig.preset("robust")
    assert {k: getattr(robust, k) for k in PRESETS["robust"]} == PRESETS["robust"]
    assert robust.eps == 24 / 255 and robust.negative_archs == "cnn,resnet20" and robust.simulates_finetuning()
    spec = cfg("--preset", "spec")
    assert spec == ProtectConfig.preset("spec") != ProtectConfig()
    assert {k: getattr(spec, k) for k in PRESETS["spec"]} == PRESETS["spec"] and not spec.simulates_finetuning()
    mixed = cfg("--eps", "16", "--negative-noise", "0", "--negative-archs", "cnn", "--iters", "3")
    assert mixed == ProtectConfig.preset("robust", eps=16 / 255, negative_noise=0.0, negative_archs="cnn", outer_iters=3)
    mixed = cfg("--preset", "spec", "--eps", "24", "--trigger-blur", "0.5", "--iters", "3")
    assert mixed == ProtectConfig.preset("spec", eps=24 / 255, trigger_blur=0.5, outer_iters=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ProtectConfig.preset("fast")
    with pytest.raises(ValueError, match="epss"):
        ProtectConfig.preset("robust", epss=0.1)


def test_cli_rejects_unknown_options():
    r = run("train", "--frobnicate", "--output", "x.safetensors")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
