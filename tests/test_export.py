"""`honeypotnet export`: the protected model as ONNX / TorchScript, checked by the engines' runtimes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from honeypotnet.bundle import load_bundle, save_bundle
from honeypotnet.cli import main
from honeypotnet.head import build_protected, head_attribute
from honeypotnet.trigger import Trigger


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_protected("cnn_small", 10, "residual", 32)
    with torch.no_grad():  # make the honeypot's MLP branch non-zero so the export covers it
        getattr(model, head_attribute(model)).mlp[2].weight.normal_(0, 0.1)
    save_bundle(d / "bundle", model, Trigger.uap(32), arch="cnn_small", target=0, classes=[str(i) for i in range(10)])
    return d / "bundle"


def test_export_onnx_runs_in_onnxruntime_with_a_dynamic_batch(bundle, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(bundle), "--format", "onnx", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "model.onnx.json").read_text())
    assert report["ok"] and report["max_abs_diff"] < 1e-5 and f"{report['max_abs_diff']:.3g}" in printed
    assert report["input_name"] == "input" and report["output_name"] == "probabilities" and report["num_classes"] == 10
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, 32, 32]
    model = load_bundle(bundle).model
    for n in (1, 6):
        x = torch.rand(n, 3, 32, 32)
        got = sess.run(["probabilities"], {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, torch.softmax(model(x), 1).detach().numpy(), atol=1e-5)


def test_export_torchscript_and_logits(bundle, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", str(bundle), "--format", "torchscript", "--output", str(out), "--logits"]) == 0
    report = json.loads((tmp_path / "model.pt.json").read_text())
    assert report["ok"] and report["output_name"] == "logits" and report["batch_sizes"] == [1, 3, 8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out))
    x = torch.rand(5, 3, 32, 32)
    assert torch.allclose(loaded(x), load_bundle(bundle).model(x), atol=1e-5)


def test_export_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_export_model_file_serves_the_protected_model_without_the_trigger(bundle, tmp_path, capsys):
    """`export --format model`: the protected model alone, as a model file `serve` (and every verb) loads,
    answering exactly as the bundle's model; the trigger is nowhere in it."""
    from safetensors.torch import load_file

    from honeypotnet.bundle import load_model
    from honeypotnet.serve import create_app

    out = tmp_path / "served.safetensors"
    assert main(["export", str(bundle), "--format", "model", "--output", str(out)]) == 0
    model, info = load_model(out)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), load_bundle(bundle).model(x), atol=1e-6)
    assert info["honeypot"]["kind"] == "residual" and not any("pattern" in k or "mask" in k for k in load_file(out))
    assert create_app(out, name="m").state.honeypotnet.served.num_classes == 10
    assert main(["export", str(out), "--format", "model", "--output", str(tmp_path / "x.safetensors")]) == 2
