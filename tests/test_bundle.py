import hashlib
import json
import shutil

import pytest
import torch

from honeypotnet.bundle import BundleError, load_bundle, load_model, read_bundle_hash, save_bundle, save_model
from honeypotnet.head import HoneypotLayer, install_honeypot
from honeypotnet.models import create_model, split_classifier
from honeypotnet.trigger import Trigger


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
    assert m["head"] == {"kind": "residual", "hidden": 32, "path": "fc"} and set(m["files"]) == {"model.safetensors", "trigger.safetensors", "trigger.png"}
    assert m["format"] == "honeypotnet-bundle/2" and b.bundle_hash == m["bundle_hash"] == read_bundle_hash(path)


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
    meta = {"format": "honeypotnet-model/1", "arch": "cnn_small", "num_classes": "10"}
    wide = {k: v.clone() for k, v in model.state_dict().items()}
    wide["fc.weight"] = torch.zeros(11, wide["fc.weight"].shape[1])  # an 11-class head in a 10-class file
    save_file(wide, str(tmp_path / "wide.safetensors"), metadata=meta)
    with pytest.raises(BundleError, match=r"fc\.weight has shape \(11, "):
        load_model(tmp_path / "wide.safetensors")
    short = {k: v.clone() for k, v in model.state_dict().items() if k != "fc.bias"}
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(BundleError, match=r"missing \['fc\.bias'\]"):
        load_model(tmp_path / "short.safetensors")


# ----------------------------------------------------------------------------- integrity: the bundle hash


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One bundle written by save_bundle, never modified: each test edits its own copy."""
    path, trig = _save(tmp_path_factory.mktemp("pristine") / "b")
    return path, trig


@pytest.fixture
def bundle(pristine, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(pristine[0], dst)
    return dst


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write(path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _canonical_hash(manifest: dict) -> str:
    """The bundle hash computed here from its definition, not with the library's helper."""
    body = {k: v for k, v in manifest.items() if k != "bundle_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_bundle_hash_covers_the_manifest_and_every_file(pristine):
    path, trig = pristine
    m = _read(path)
    # every file save_bundle wrote, except the manifest and the hash file, is listed with its own hash
    on_disk = {f.name for f in path.iterdir()} - {"manifest.json", "bundle.sha256"}
    assert set(m["files"]) == on_disk == {"model.safetensors", "trigger.safetensors", "trigger.png"}
    assert all(m["files"][n] == _sha(path / n) for n in on_disk)
    # the bundle hash is the SHA-256 of the canonical manifest without itself, and bundle.sha256 repeats it
    h = _canonical_hash(m)
    assert m["bundle_hash"] == h and (path / "bundle.sha256").read_text() == h + "\n"
    b = load_bundle(path, expected_hash=h)
    assert b.bundle_hash == h and b.tau0 == 0.07 and b.target == 3 and torch.equal(b.trigger.pattern, trig.pattern)
    assert load_bundle(path, expected_hash=" " + h.upper() + "\n").bundle_hash == h  # as pasted back by the owner
    # the hash does not depend on the manifest's layout: the same fields, reformatted, load
    (path / "manifest.json").write_text(json.dumps(m, separators=(",", ":"), sort_keys=True))
    try:
        assert load_bundle(path).bundle_hash == h
    finally:
        _write(path, m)


def _edit_field(field, value):
    def edit(path):
        m = _read(path)
        if field == "tau0":
            m["verification"]["tau0"] = value
        else:
            m[field] = value
        _write(path, m)
    return edit


def _other_trigger_file(path):
    """A valid trigger file for the same image size, but not the bundle's trigger."""
    from safetensors.torch import save_file

    t = Trigger.uap(32, 16 / 255)
    t.pattern.uniform_(-1, 1)
    t.project_()
    save_file({"pattern": t.pattern.contiguous(), "mask": t.mask.contiguous()}, str(path / "trigger.safetensors"))


def _swap_trigger(path):
    _other_trigger_file(path)


def _swap_trigger_and_its_listed_hash(path):
    """The trigger swapped and the manifest's 'files' entry updated to match: only the bundle hash sees it."""
    _other_trigger_file(path)
    m = _read(path)
    m["files"]["trigger.safetensors"] = _sha(path / "trigger.safetensors")
    _write(path, m)


def _corrupt_model(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


def _replace_model_and_its_listed_hash(path):
    """Other valid weights for the same architecture, with the 'files' entry updated to match."""
    from safetensors.torch import save_file

    other = _protected(seed=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path / "model.safetensors"))
    m = _read(path)
    m["files"]["model.safetensors"] = _sha(path / "model.safetensors")
    _write(path, m)


def _delete(name):
    return lambda path: (path / name).unlink()


def _delete_png_and_its_entry(path):
    (path / "trigger.png").unlink()
    m = _read(path)
    del m["files"]["trigger.png"]
    _write(path, m)


def _edit_hash_file(path):
    (path / "bundle.sha256").write_text("0" * 64 + "\n")


def _drop_bundle_hash(path):
    m = _read(path)
    del m["bundle_hash"]
    _write(path, m)


def _reseal_with_tau0(path):
    """tau0 edited and both hashes recomputed: consistent in itself, only the owner's kept hash differs."""
    m = _read(path)
    m["verification"]["tau0"] = 0.5
    m["bundle_hash"] = _canonical_hash(m)
    _write(path, m)
    (path / "bundle.sha256").write_text(m["bundle_hash"] + "\n")


def _as_old_version(path):
    """What the previous writer produced: format /1, no bundle hash, no bundle.sha256."""
    m = _read(path)
    del m["bundle_hash"]
    m["format"] = "honeypotnet-bundle/1"
    _write(path, m)
    (path / "bundle.sha256").unlink()


def _escape_the_directory(path):
    m = _read(path)
    m["files"]["../outside"] = m["files"].pop("trigger.png")
    m["bundle_hash"] = _canonical_hash(m)
    _write(path, m)
    (path / "bundle.sha256").write_text(m["bundle_hash"] + "\n")


# (id, what is done to a copy of the bundle, what the refusal must say)
TAMPERING = [
    ("tau0-edited", _edit_field("tau0", 0.5), r"manifest\.json was modified after the bundle was written.*bundle_hash"),
    ("target-edited", _edit_field("target", 4), r"manifest\.json was modified after the bundle was written.*bundle_hash"),
    ("classes-edited", _edit_field("classes", [f"x{i}" for i in range(10)]), r"manifest\.json was modified"),
    ("trigger-swapped", _swap_trigger, r"hash mismatch for \S*trigger\.safetensors"),
    ("trigger-swapped-and-listed", _swap_trigger_and_its_listed_hash, r"manifest\.json was modified"),
    ("model-corrupted", _corrupt_model, r"hash mismatch for \S*model\.safetensors"),
    ("model-replaced-and-listed", _replace_model_and_its_listed_hash, r"manifest\.json was modified"),
    ("trigger-deleted", _delete("trigger.safetensors"), r"bundle file missing: \S*trigger\.safetensors"),
    ("png-deleted", _delete("trigger.png"), r"bundle file missing: \S*trigger\.png"),
    ("png-deleted-and-unlisted", _delete_png_and_its_entry, r"manifest\.json was modified"),
    ("hash-file-deleted", _delete("bundle.sha256"), r"bundle file missing: \S*bundle\.sha256"),
    ("hash-file-edited", _edit_hash_file, r"bundle\.sha256 says '0{64}' but the manifest's bundle_hash is [0-9a-f]{64}"),
    ("bundle-hash-dropped", _drop_bundle_hash, r"manifest\.json has no bundle_hash"),
    ("old-version", _as_old_version, r"older version of honeypotnet.*honeypotnet-bundle/1.*protect the model again"),
    ("path-escape", _escape_the_directory, r"'\.\./outside' is not a file name"),
]


@pytest.mark.parametrize("tamper, message", [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING])
def test_bundle_refuses_every_kind_of_tampering(bundle, tamper, message):
    load_bundle(bundle)  # the copy is sound before the edit
    tamper(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_owner_kept_hash_catches_a_bundle_rewritten_with_fresh_hashes(bundle, pristine):
    kept = read_bundle_hash(pristine[0])
    assert load_bundle(bundle, expected_hash=kept).tau0 == 0.07
    _reseal_with_tau0(bundle)
    assert load_bundle(bundle).tau0 == 0.5  # consistent in itself: only the owner's hash can tell
    with pytest.raises(BundleError, match=rf"bundle hash [0-9a-f]{{64}} is not the expected {kept}"):
        load_bundle(bundle, expected_hash=kept)


def test_bundle_hash_changes_with_every_field_and_save_refuses_reserved_extras(tmp_path):
    """Two saves of the same model differ only in tau0: different bundle hashes (the hash is not of
    the files alone); `extra` cannot overwrite the integrity fields."""
    model = _protected()
    a, _ = _save(tmp_path / "a", model)
    trig = Trigger.uap(32, 16 / 255)
    b = save_bundle(tmp_path / "b", model, trig, arch="cnn_small", target=3, classes=[f"c{i}" for i in range(10)],
                    verification={"tau0": 0.08})
    assert _read(a)["files"]["model.safetensors"] == _read(b)["files"]["model.safetensors"]
    assert read_bundle_hash(a) != read_bundle_hash(b)
    for field in ("files", "bundle_hash"):
        with pytest.raises(BundleError, match=f"may not set the manifest field '{field}'"):
            _save(tmp_path / field, extra={field: {}})
        assert not (tmp_path / field).exists()


# ----------------------------------------------------------------------------- the suite's shared-data switch
# (tests/conftest.py: with HONEYPOTNET_REQUIRE_SHARED=1, as .ci/run sets it, missing ../shared data fails
# a test instead of skipping it)

_NEEDS_SHARED = '''
def test_folder(shared_dir):
    assert shared_dir.is_dir()


def test_tarball(cifar10_jpeg_root):
    pass


def test_own_file(missing_shared):
    missing_shared("no resnet99 weights here")
'''


def _run_with_shared(pytester, monkeypatch, tmp_path, shared, require: str | None) -> tuple[int, dict, str]:
    """A tiny pytest session (a copy of tests/conftest.py and three tests that need shared data), run in this
    process by pytester, with HONEYPOTNET_SHARED=`shared`; returns (exit status, {outcome: count}, output)."""
    from pathlib import Path

    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_needs_shared=_NEEDS_SHARED)
    monkeypatch.setenv("HONEYPOTNET_SHARED", str(shared))
    monkeypatch.setenv("HONEYPOTNET_CACHE", str(tmp_path / "cache"))
    if require is None:
        monkeypatch.delenv("HONEYPOTNET_REQUIRE_SHARED", raising=False)
    else:
        monkeypatch.setenv("HONEYPOTNET_REQUIRE_SHARED", require)
    res = pytester.runpytest_inprocess("-q", "-rA", "-p", "no:cacheprovider")
    out = str(res.stdout) + str(res.stderr)
    counts = {k: v for k, v in res.parseoutcomes().items() if v}
    return int(res.ret), {("error" if k == "errors" else k): v for k, v in counts.items()}, out


def test_required_shared_data_fails_instead_of_skipping(pytester, monkeypatch, tmp_path):
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    rc, counts, out = _run_with_shared(pytester, monkeypatch, tmp_path, empty, "1")
    # the folder is there, its tarball and the weights are not: one pass, the two others fail (not skip)
    assert rc == 1 and counts == {"passed": 1, "failed": 1, "error": 1}, out
    assert "cifar10-jpeg.tar.gz not present (HONEYPOTNET_REQUIRE_SHARED=1" in out and "no resnet99 weights here" in out


def test_missing_shared_folder_fails_when_required_and_skips_otherwise(pytester, monkeypatch, tmp_path):
    absent = tmp_path / "no-shared"
    rc, counts, out = _run_with_shared(pytester, monkeypatch, tmp_path / "required", absent, "1")
    assert rc == 1 and counts == {"failed": 1, "error": 2}, out
    assert f"shared folder {absent} not present" in out
    rc, counts, out = _run_with_shared(pytester, monkeypatch, tmp_path / "optional", absent, None)
    assert rc == 0 and counts == {"skipped": 3}, out
