import json

import pytest
import torch

from honeypotnet.bundle import BundleError, load_bundle, load_model, save_bundle, save_model
from honeypotnet.honeypot import HoneypotLayer, Trigger, install_honeypot
from honeypotnet.models import create_model, split_classifier


def _protected(seed=0):
    torch.manual_seed(seed)
    victim = create_model("cnn_small", 10).eval()
    layer = HoneypotLayer.from_linear(split_classifier(victim)[1], "residual", 32)
    torch.nn.init.normal_(layer.mlp[2].weight)  # make the head differ from the victim's
    return install_honeypot(victim, layer)


def _save(path, model=None, **kw):
    trig = Trigger.uap(32, 16 / 255)
    trig.pattern.uniform_(-1, 1)
    trig.project_()
    return save_bundle(path, model or _protected(), trig, arch="cnn_small", target=3,
                       classes=[f"c{i}" for i in range(10)], verification={"tau0": 0.07}, **kw), trig


def test_bundle_round_trip(tmp_path):
    model = _protected()
    path, trig = _save(tmp_path / "b", model)
    b = load_bundle(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(b.model(x), model(x), atol=1e-6)
    assert torch.equal(b.trigger.pattern, trig.pattern) and b.target == 3 and b.tau0 == 0.07
    assert (path / "trigger.png").stat().st_size > 0
    m = json.loads((path / "manifest.json").read_text())
    assert m["head"] == {"kind": "residual", "hidden": 32} and set(m["files"]) == {"model.safetensors", "trigger.safetensors", "trigger.png"}


def test_bundle_refuses_tampering(tmp_path):
    path, _ = _save(tmp_path / "b")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="hash mismatch"):
        load_bundle(path)


def test_bundle_refuses_edited_manifest_and_missing_files(tmp_path):
    path, _ = _save(tmp_path / "b")
    (path / "trigger.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)
    path2, _ = _save(tmp_path / "c")
    (path2 / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path2)
    with pytest.raises(BundleError, match="no manifest"):
        load_bundle(tmp_path / "nothing")


def test_bundle_is_not_overwritten_by_accident(tmp_path):
    path, _ = _save(tmp_path / "b")
    before = (path / "manifest.json").read_text()
    with pytest.raises(BundleError, match="already exists"):
        _save(tmp_path / "b")
    assert (path / "manifest.json").read_text() == before
    with pytest.raises(BundleError, match="HoneypotLayer"):
        save_bundle(tmp_path / "x", create_model("cnn_small", 10), Trigger.uap(32), arch="cnn_small", target=0, classes=list("abcdefghij"))
    assert not (tmp_path / "x").exists()


def test_model_file_round_trip_and_errors(tmp_path):
    model = create_model("cnn_small", 10).eval()
    save_model(model, tmp_path / "m.safetensors", "cnn_small", 10, list("abcdefghij"), note="x")
    loaded, info = load_model(tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    assert info["arch"] == "cnn_small" and info["classes"] == list("abcdefghij") and info["note"] == "x"
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BundleError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(BundleError, match="not found"):
        load_model(tmp_path / "none.safetensors")
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["fc.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata={"format": "honeypotnet-model/1", "arch": "cnn_small", "num_classes": "10"})
    with pytest.raises(BundleError, match="NaN"):
        load_model(tmp_path / "nan.safetensors")
