"""The CLI as a user runs it: real files, tiny sizes. Most calls run in-process (`main(argv)`, the same code
path as the console script); one real process per verb checks the entry point itself."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from honeypotnet.cli import build_parser, main
from honeypotnet.cli.protect import protect_config
from honeypotnet.config import ProtectConfig

VERBS = ("demo", "train", "protect", "extract", "verify", "serve", "keys", "log", "export")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "honeypotnet.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def call(capsys, *args) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit status, stdout, stderr); argparse's own errors exit 2 too."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_installed_console_script_and_the_module_run_as_processes():
    """The two entry points a user types, each as a real process: the `honeypotnet` console script that
    `pip install` puts beside the interpreter, and `python -m honeypotnet.cli`; both list every verb."""
    script = Path(sys.executable).with_name("honeypotnet")
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "honeypotnet.cli", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.startswith("usage: honeypotnet"), (cmd, r.stderr)
        assert all(verb in r.stdout for verb in VERBS), r.stdout


def test_help_and_option_errors_answer_without_importing_torch():
    """Building the parser (every verb's --help, a mistyped option) and `import honeypotnet` import neither torch nor
    the libraries it pulls in, so they answer at once; the package's names still resolve to what they were."""
    code = f"""
import sys
import honeypotnet
from honeypotnet.cli import main
for argv in [["--help"], *[[verb, "--help"] for verb in {list(VERBS)!r}], ["train", "--frobnicate"]]:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == (2 if "--frobnicate" in argv else 0), (argv, e.code)
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "torchvision", "scipy", "numpy", "fastapi"}})
print("HEAVY", heavy)
from honeypotnet import protect, verify
import honeypotnet.protect
print("NAMES", type(protect).__name__, type(honeypotnet.protect).__name__, type(honeypotnet.verify).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HEAVY []" in r.stdout, r.stdout[-500:]
    assert "NAMES function function function" in r.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    rc, out, err = call(capsys, verb, "--help")
    assert rc == 0 and "usage: honeypotnet " + verb in out, err


def test_protect_help_shows_at_most_20_options(capsys):
    from honeypotnet.negatives import NegativeCache

    _, out, _ = call(capsys, "protect", "--help")
    options = [line for line in out.splitlines() if line.startswith("  -")]
    assert len(options) <= 20, options
    for needed in ("--preset", "--config", "--set", "--references", "--device", "--output", "--work-dir"):
        assert needed in out
    # the negatives cache's bound, told in the description (the CLI does not import the library to build it)
    assert f"the {NegativeCache.KEEP} most recently used" in " ".join(out.split())


def test_cli_chain_train_protect_extract_verify(tmp_path, capsys):
    victim = tmp_path / "victim.safetensors"
    rc, out, err = call(capsys, "train", "--data", "shapes", "--data-limit", "2000", "--epochs", "5", "--batch-size", "64", "--output", victim)
    assert rc == 0, err
    assert json.loads(victim.with_suffix(".json").read_text())["test_accuracy"] > 0.5
    bundle = tmp_path / "bundle"
    # --preset spec with config fields turned on one by one through --set (the robust default has its own test)
    rc, out, err = call(capsys, "protect", victim, "--preset", "spec", "--shadow", "shapes:shadow:800",
                        "--owner", "shapes:train:400", "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small",
                        "--set", "shadow.epochs=1", "--set", "head.steps=20", "--references", "cnn_small",
                        "--set", "null.epochs=1", "--set", "null.finetune=100", "--set", "null.purify=blur-1.0,jpeg-q50",
                        "--set", "null.purify_max_drop=100", "--set", "negatives.weight=1", "--set", "negatives.noise=0.1",
                        "--set", "trigger.blur=0.5", "--force", "--output", bundle)
    assert rc == 0, err
    assert "fails its gate" in err and "--force" in err  # one iteration: written only because it was forced
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert 0 < manifest["verification"]["tau0"] <= 0.5 and manifest["history"][0]["iteration"] == 1
    # null.finetune: the reference and its 4 fine-tuned copies calibrate the null;
    # null.purify: ... and each of those 5 behind a blur (σ 1) and behind JPEG q50
    plain = ["cnn_small", *(f"cnn_small+finetune-e{e}-lr{lr:g}" for e, lr in ((3, 0.01), (10, 0.01), (3, 0.05), (10, 0.05)))]
    refs = manifest["verification"]["reference"]
    assert [r["arch"] for r in refs] == plain + [f"{n}+{p}" for n in plain for p in ("blur-1.0", "jpeg-q50")]
    assert manifest["verification"]["reference_finetune"]["images"] == 100
    assert [n for n, _ in manifest["verification"]["reference_purify"]["settings"]] == ["blur-1.0", "jpeg-q50"]
    # the config as a whole, in its file form, with each --set applied; the negative shadow is reported
    c = ProtectConfig.from_dict({k: v for k, v in manifest["config"].items() if k != "preset"})
    assert c == ProtectConfig.preset("spec", outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1,
                                     honeypot_steps=20, negative_weight=1.0, negative_noise=0.1, trigger_blur=0.5)
    assert manifest["config"]["preset"] == "spec" and 0 <= manifest["history"][0]["negative0_cnn_small_asr"] <= 1
    # protecting again into the same place is refused and leaves the bundle intact
    rc, out, err = call(capsys, "protect", victim, "--shadow", "shapes:shadow:100", "--owner", "shapes:train:100",
                        "--set", "loop.outer_iters=0",
                        "--references", "", "--output", bundle, "--work-dir", tmp_path / "w2")
    assert rc == 2 and "already exists" in err
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    sub = tmp_path / "sub.safetensors"
    rc, out, err = call(capsys, "extract", bundle, "--pool", "shapes:pool", "--budget", "500", "--epochs", "1",
                        "--output-mode", "label", "--eval", "shapes", "--output", sub)
    assert rc == 0, err
    res = json.loads(sub.with_suffix(".json").read_text())
    assert res["queries"] == 500 and res["output_mode"] == "label" and 0 <= res["substitute_accuracy"] <= 1
    out_json = tmp_path / "verify.json"
    report = tmp_path / "report.html"
    rc, out, err = call(capsys, "verify", bundle, sub, "--data", "shapes:test", "--data-limit", "300", "--json", out_json,
                        "--report", report)
    v = json.loads(out_json.read_text())
    assert rc == (0 if v["stolen"] else 1), err  # the exit status tells scripts the verdict
    rc, out, err = call(capsys, "verify", bundle, bundle, "--data", "shapes:test", "--max-queries", "100",
                        "--json", tmp_path / "seq.json")  # the protected model itself obeys its trigger
    assert rc in (0, 1), err
    seq = json.loads((tmp_path / "seq.json").read_text())
    assert seq["sequential"]["stamped_queries"] <= 100 and seq["queries"] == seq["n"] and "sequential test" in out
    assert rc == (0 if seq["stolen"] else 1) and seq["alpha"] == 1e-6
    rc2, _, err2 = call(capsys, "verify", bundle, bundle, "--data", "shapes:test", "--stolen-asr", "0.2")
    assert rc2 == 2 and "--max-queries" in err2  # the sequential test's option, refused without it
    page = report.read_text()
    assert v["verdict"] in page and manifest["bundle_hash"] in page and "data:image/png;base64," in page
    assert f"{100 * v['tau0']:.2f}%" in page and "confidence interval" in page
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert v["n"] > 200 and {"asr", "tau0", "p_value", "verdict", "unstamped_rate"} <= set(v)
    assert "verdict" in out


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "mnist", "--output", "x.safetensors"], "unknown dataset"),
    (["train", "--output", "x.safetensors"], "the following arguments are required: --data"),
    (["protect", "v.safetensors", "--owner", "shapes", "--output", "b"], "required: --shadow"),
    (["verify", "bundle", "suspect.safetensors"], "required: --data"),
    (["protect", "v.pt", "--shadow", "shapes", "--owner", "shapes", "--output", "b"], "say its architecture with --arch"),
    (["train", "--data", "imagefolder", "--output", "x.safetensors"], "root"),
    (["train", "--data", "shapes", "--arch", "vgg99", "--data-limit", "10", "--epochs", "0", "--output", "x.safetensors"], "vgg99"),
    (["train", "--data", "shapes:train:x", "--output", "x.safetensors"], "limit must be an integer"),
    (["train", "--data", "shapes", "--device", "tpu", "--output", "x.safetensors"], "unknown device"),
    (["verify", "no-such-bundle", "no-such-model", "--data", "shapes"], "no manifest"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "negatives.weight=nan", "--output", "b"], "negatives.weight"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "negatives.archs=cnn,vgg99", "--output", "b"], "vgg99"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--preset", "spec", "--set", "negatives.finetune_epochs=2", "--output", "b"],
     "negatives.finetune_epochs"),
    # negatives off under the robust default, their fine-tuned copies left on: told which field
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "negatives.weight=0", "--output", "b"], "negatives.finetune_epochs"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "trigger.blur=-1", "--output", "b"], "trigger.blur"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "negatives.noise=nan", "--output", "b"], "negatives.noise"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "trigger.epss=0.1", "--output", "b"], "unknown config field 'trigger.epss'"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "loop.outer_iters=2.5", "--output", "b"], "must be an integer"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "eps", "--output", "b"], "field=value"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "null.purify=blur-2", "--output", "b"], "unknown purification blur-2"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "null.purify_max_drop=nan", "--output", "b"], "purify_max_drop"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--set", "null.frobnicate=1", "--output", "b"], "unknown null setting"),
    (["protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--config", "nowhere.toml", "--output", "b"], "cannot read config file"),
    (["extract", "missing.safetensors", "--pool", "shapes", "--output", "s.safetensors"], "not found"),
])
def test_cli_bad_input_gives_one_clear_error(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    rc, out, err = call(capsys, *args)
    assert rc == 2, (out, err)
    assert message.lower() in err.lower() and "Traceback" not in err


def test_cli_bad_input_as_a_process_exits_2_without_traceback(tmp_path):
    r = run("protect", "missing.safetensors", "--shadow", "shapes", "--owner", "shapes", "--preset", "fast",
            "--output", "b", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "--data", "shapes", "--frobnicate", "--output", "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_cli_protect_default_is_the_robust_configuration(tmp_path, capsys):
    """`protect` with no --preset runs the robust configuration end to end (toy size): the bundle records it,
    and every model it adds to the loop is trained and reported: the CNN and ResNet-20 negative shadows and
    their fine-tuned copies."""
    victim = tmp_path / "victim.safetensors"
    rc, _, err = call(capsys, "train", "--data", "shapes", "--data-limit", "600", "--epochs", "1", "--batch-size", "64", "--output", victim)
    assert rc == 0, err
    bundle = tmp_path / "bundle"
    rc, _, err = call(capsys, "protect", victim, "--shadow", "shapes:shadow:300", "--owner", "shapes:train:200",
                      "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small", "--set", "shadow.epochs=1",
                      "--set", "head.steps=5", "--set", "trigger.passes=1", "--references", "", "--force",
                      "--output", bundle)
    assert rc == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    c = manifest["config"]
    assert c["preset"] == "robust" and c["trigger"]["eps"] == 24 / 255 and c["version"] == 2
    assert c["negatives"] == ProtectConfig().to_dict()["negatives"] and c["thief"]["finetune_epochs"] == 2
    (rec,) = manifest["history"]
    for key in ("negative0_cnn_asr", "negative1_resnet20_asr", "negative0_cnn_ft_asr", "negative1_resnet20_ft_asr"):
        assert 0 <= rec[key] <= 1, key


def test_protect_config_from_preset_file_and_set(tmp_path):
    """--preset names a file of configs/; --config reads the user's own file (its [null] section too);
    --set changes single fields on top; --target and --seed are shorthands for two of them."""
    def cfg(*extra):
        return protect_config(build_parser().parse_args(["protect", "v.safetensors", "--shadow", "shapes", "--owner",
                                                         "shapes", "--output", "b", *extra]))

    robust, null = cfg()
    assert robust == cfg("--preset", "robust")[0] == ProtectConfig() == ProtectConfig.preset("robust")
    assert null == {"epochs": 10, "finetune": 0, "purify": "", "purify_max_drop": 20.0}
    spec, _ = cfg("--preset", "spec")
    assert spec == ProtectConfig.preset("spec") != ProtectConfig() and not spec.simulates_finetuning()
    mixed, _ = cfg("--set", "trigger.eps=16/255", "--set", "negatives.noise=0", "--set", "negatives.archs=cnn",
                   "--set", "outer_iters=3", "--target", "2", "--seed", "5")
    assert mixed == ProtectConfig.preset("robust", eps=16 / 255, negative_noise=0.0, negative_archs="cnn",
                                         outer_iters=3, target=2, seed=5)
    own = tmp_path / "mine.toml"
    own.write_text(ProtectConfig.preset("spec", lam=2.0).to_toml() + "\n[null]\nepochs = 3\npurify = [\"jpeg-q75\"]\n")
    mine, null = cfg("--config", str(own), "--set", "head.hidden=64")
    assert mine == ProtectConfig.preset("spec", lam=2.0, hidden=64)
    assert null["epochs"] == 3 and null["purify"] == "jpeg-q75"
    bad = tmp_path / "bad.toml"
    bad.write_text("[trigger]\neps = 'lots'\n")
    with pytest.raises(ValueError, match="trigger.eps must be a number"):
        cfg("--config", str(bad))


def test_protect_gate_refuses_an_unfit_bundle_and_keeps_the_run(tmp_path, capsys):
    """Zero outer iterations protect nothing: `protect` refuses to write the bundle (exit 2, nothing written),
    says why and how to go on; the same command with --force writes it."""
    victim = tmp_path / "victim.safetensors"
    rc, _, err = call(capsys, "train", "--data", "shapes", "--data-limit", "300", "--epochs", "1", "--output", victim)
    assert rc == 0, err
    args = ["protect", victim, "--preset", "spec", "--shadow", "shapes:shadow:100", "--owner", "shapes:train:100",
            "--set", "loop.outer_iters=0", "--references", "", "--output", tmp_path / "b"]
    rc, _, err = call(capsys, *args)
    assert rc == 2 and "fails its gate" in err and "no outer iteration" in err and "--force" in err
    assert not (tmp_path / "b").exists()
    rc, _, err = call(capsys, *args, "--force")
    assert rc == 0 and (tmp_path / "b" / "manifest.json").is_file()


def test_protect_caches_the_negatives_once_extracted_and_a_later_run_loads_them(tmp_path, monkeypatch, capsys):
    """With negatives.once, `protect` writes the innocent models to $HONEYPOTNET_CACHE/negatives; a second
    protection of the same victim on the same images with another target loads them (the file is not
    written again), and the same command in a fresh work dir makes the same trigger as the first."""
    from safetensors.torch import load_file

    monkeypatch.setenv("HONEYPOTNET_CACHE", str(tmp_path / "cache"))
    victim = tmp_path / "victim.safetensors"
    rc, _, err = call(capsys, "train", "--data", "shapes", "--data-limit", "300", "--epochs", "1", "--output", victim)
    assert rc == 0, err
    args = ["protect", victim, "--preset", "spec", "--shadow", "shapes:shadow:100", "--owner", "shapes:train:100",
            "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small", "--set", "shadow.epochs=1",
            "--set", "head.steps=5", "--set", "trigger.passes=1", "--set", "negatives.weight=1",
            "--set", "negatives.archs=cnn_small", "--set", "negatives.once=1", "--references", "", "--force"]
    rc, _, err = call(capsys, *args, "--output", tmp_path / "a")
    assert rc == 0, err
    (entry,) = (tmp_path / "cache" / "negatives").glob("*.safetensors")
    written = entry.stat().st_ino  # a write replaces the file (atomically), a load only marks it used
    rc, _, err = call(capsys, *args, "--target", "3", "--output", tmp_path / "b")
    assert rc == 0, err
    rc, _, err = call(capsys, *args, "--output", tmp_path / "c")
    assert rc == 0, err
    assert entry.stat().st_ino == written and len(list(entry.parent.iterdir())) == 1
    first, again = (load_file(str(tmp_path / b / "trigger.safetensors")) for b in ("a", "c"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # $HONEYPOTNET_NEGATIVES_CACHE=DIR caches there instead, empty nowhere
    monkeypatch.setenv("HONEYPOTNET_NEGATIVES_CACHE", str(tmp_path / "mine"))
    rc, _, err = call(capsys, *args, "--output", tmp_path / "d")
    assert rc == 0, err
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 1
    monkeypatch.setenv("HONEYPOTNET_NEGATIVES_CACHE", "")
    rc, _, err = call(capsys, *args, "--output", tmp_path / "e")
    assert rc == 0, err
    assert entry.stat().st_ino == written and len(list(entry.parent.iterdir())) == 1
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 1
    third = load_file(str(tmp_path / "e" / "trigger.safetensors"))
    assert all(torch.equal(first[k], third[k]) for k in first)  # trained again, the same protection


def test_verify_refuses_data_of_another_task(tmp_path, capsys):
    """A 3-class bundle verified with 10-class data (or other class names) is refused, never given a verdict:
    such a run once declared an innocent model STOLEN."""
    import torch

    from honeypotnet.bundle import save_bundle, save_model
    from honeypotnet.head import build_protected
    from honeypotnet.models import create_model
    from honeypotnet.trigger import Trigger

    save_bundle(tmp_path / "b3", build_protected("cnn_small", 3, "linear", 8), Trigger.uap(32), arch="cnn_small",
                target=0, classes=["a", "b", "c"], verification={"tau0": 0.05})
    torch.manual_seed(0)
    save_model(create_model("cnn_small", 3), tmp_path / "innocent.safetensors", "cnn_small", 3, ["a", "b", "c"])
    rc, out, err = call(capsys, "verify", tmp_path / "b3", tmp_path / "innocent.safetensors", "--data", "shapes:test:200")
    assert rc == 2 and "10 classes but the bundle 3" in err and "STOLEN" not in out


def test_protect_a_torchvision_state_dict_end_to_end(tmp_path, capsys):
    """A user's own torchvision model (MobileNetV3, head classifier[-1]) as a plain state dict: protect with
    --arch torchvision:NAME (classes read from the weights), then the bundle reloads in verify and export, and
    the protected weights of a linear head load back into torchvision's own class."""
    import torch
    import torchvision

    from honeypotnet.bundle import load_bundle
    from honeypotnet.head import as_plain_model

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "mine.pth")
    bundle = tmp_path / "bundle"
    rc, out, err = call(capsys, "protect", tmp_path / "mine.pth", "--arch", "torchvision:mobilenet_v3_small",
                        "--preset", "spec", "--shadow", "shapes:shadow:200", "--owner", "shapes:train:200",
                        "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small", "--set", "shadow.epochs=1",
                        "--set", "head.steps=5", "--set", "head.kind=linear", "--references", "", "--force",
                        "--output", bundle)
    assert rc == 0, err
    b = load_bundle(bundle)
    assert b.manifest["arch"] == "torchvision:mobilenet_v3_small" and b.manifest["head"]["path"] == "1.classifier.3"
    assert b.manifest["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    plain = as_plain_model(b.model)[1]  # the torchvision model inside the Normalize wrapper
    fresh = torchvision.models.mobilenet_v3_small(num_classes=10)
    fresh.load_state_dict(plain.state_dict())
    fresh.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(b.model(x), fresh(b.model[0](x)), atol=1e-5)
    rc, out, err = call(capsys, "export", bundle, "--format", "torchscript", "--output", tmp_path / "m.pt")
    assert rc == 0, err
    rc, out, err = call(capsys, "protect", tmp_path / "mine.pth", "--arch", "torchvision:resnet18", "--shadow",
                        "shapes", "--owner", "shapes", "--output", tmp_path / "x")
    assert rc == 2 and "resnet18" in err


def test_verify_image_size_must_be_the_bundles(tmp_path, capsys):
    """verify resizes the held-out images to the bundle's trigger size; an --image-size that differs is refused
    with the reason (a trigger is stamped at the size it was made for), the bundle's own size is accepted."""
    import torch

    from honeypotnet.bundle import save_bundle
    from honeypotnet.head import build_protected
    from honeypotnet.trigger import Trigger

    save_bundle(tmp_path / "b", build_protected("cnn_small", 10, "linear", 8), Trigger.uap(32), arch="cnn_small",
                target=0, classes=[f"c{i}" for i in range(10)], verification={"tau0": 0.05})
    torch.manual_seed(0)
    rc, out, err = call(capsys, "verify", tmp_path / "b", tmp_path / "b", "--data", "shapes:test:50", "--image-size", "64")
    assert rc == 2 and "--image-size 64" in err and "32x32" in err and "STOLEN" not in out
    rc, out, err = call(capsys, "verify", tmp_path / "b", tmp_path / "b", "--data", "shapes:test:50", "--image-size", "32")
    assert rc == 2 and "class names differ" in err  # past the size check: the embedded data's names are not c0..c9


def test_bundle_trigger_png_is_readable(tmp_path):
    """trigger.png: the trigger amplified to the full range (a weak trigger too), after an example clean and
    stamped when one is given, enlarged to a size people can see; the bare trigger alone otherwise."""
    import numpy as np
    import torch
    from PIL import Image

    from honeypotnet.bundle import load_bundle, save_bundle
    from honeypotnet.head import build_protected
    from honeypotnet.trigger import Trigger

    t = Trigger.uap(32, 16 / 255)
    t.pattern.copy_(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)).sign() * 2 / 255)  # weak
    example = torch.full((3, 32, 32), 0.5)
    for name, ex in (("with", example), ("without", None)):
        save_bundle(tmp_path / name, build_protected("cnn_small", 3, "linear", 8), t, arch="cnn_small", target=0,
                    classes=["a", "b", "c"], example=ex)
        assert load_bundle(tmp_path / name).trigger.image_size == 32  # the picture is covered by the bundle's hashes
    pic = np.asarray(Image.open(tmp_path / "with" / "trigger.png").convert("RGB")).astype(int)
    side = pic.shape[0]
    assert side >= 192 and pic.shape[1] == 3 * side + 2 * 4  # clean | stamped | trigger, 4 px apart
    clean, stamped, trig = pic[:, :side], pic[:, side + 4: 2 * side + 4], pic[:, 2 * side + 8:]
    assert trig.min() == 0 and trig.max() == 255  # amplified: ±2/255 spans the whole range
    assert (clean == 128).all() and 0 < np.abs(stamped - clean).max() <= 3  # the stamp itself is faint
    alone = np.asarray(Image.open(tmp_path / "without" / "trigger.png").convert("RGB")).astype(int)
    assert alone.shape == trig.shape and (alone == trig).all()


def test_protect_streams_a_file_dataset_larger_than_the_threshold(tmp_path, monkeypatch, capsys):
    """A folder / ImageFolder set above $HONEYPOTNET_STREAM_BYTES (0: every one) is decoded batch by batch: the
    run says so and gives the bundle the in-memory run gives; below it (the default 4G) the set is loaded."""
    import torch
    from PIL import Image

    from honeypotnet.bundle import load_bundle, save_model
    from honeypotnet.data import load_dataset
    from honeypotnet.models import create_model

    shadow = load_dataset("shapes", split="shadow", n=60).images
    owner = load_dataset("shapes", split="train", n=40)
    for i, x in enumerate(shadow):  # the default split of both is train
        (tmp_path / "shadow" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "shadow" / "train" / f"{i}.png")
    for i, (x, y) in enumerate(zip(owner.images, owner.labels)):
        (tmp_path / "owner" / "train" / owner.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "owner" / "train" / owner.classes[y] / f"{i}.png")
    torch.manual_seed(0)
    save_model(create_model("cnn_small", 10), tmp_path / "v.safetensors", "cnn_small", 10, owner.classes)
    args = ["protect", tmp_path / "v.safetensors", "--preset", "spec", "--shadow", "folder", "--shadow-root",
            tmp_path / "shadow", "--owner", "imagefolder::30", "--owner-root", tmp_path / "owner", "--image-size", "24",
            "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small", "--set", "shadow.epochs=1",
            "--set", "head.steps=5", "--set", "trigger.passes=1", "--references", "", "--force"]
    monkeypatch.setenv("HONEYPOTNET_CACHE", str(tmp_path / "cache"))
    rc, _, err = call(capsys, *args, "--output", tmp_path / "loaded")
    assert rc == 0 and "streaming" not in err, err
    monkeypatch.setenv("HONEYPOTNET_STREAM_BYTES", "0")
    rc, _, err = call(capsys, *args, "--output", tmp_path / "streamed")
    assert rc == 0, err
    assert "streaming --shadow train: 60 images of 24 px" in err and "streaming --owner owner/train: 30 images" in err
    a, b = load_bundle(tmp_path / "loaded"), load_bundle(tmp_path / "streamed")
    assert torch.equal(a.trigger.pattern, b.trigger.pattern) and a.manifest["history"] == b.manifest["history"]
    assert (tmp_path / "streamed" / "trigger.png").read_bytes() == (tmp_path / "loaded" / "trigger.png").read_bytes()
    monkeypatch.setenv("HONEYPOTNET_STREAM_BYTES", "lots")
    rc, _, err = call(capsys, *args, "--output", tmp_path / "bad")
    assert rc == 2 and "HONEYPOTNET_STREAM_BYTES" in err
