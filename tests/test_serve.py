"""The HTTP server, its keys, limits and query log, and the HTTP oracle: against a real uvicorn
server on 127.0.0.1 (a thread, or a subprocess for kill -9), never a mock.

The end-to-end test (serve bundle -> extract over HTTP -> serve substitute -> verify over HTTP)
needs a bundle whose backdoor transfers; it is trained once per module (small sizes, about 20 s
on 2 CPU cores) into a temporary directory, nothing kept between runs.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from honeypotnet.apikeys import KeyFileError, add_key, hash_token, read_keys
from honeypotnet.bundle import load_bundle, load_model, save_bundle, save_model
from honeypotnet.cli import main
from honeypotnet.head import build_protected
from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.oracles_http import HttpOracle, HttpOracleError, encode_request
from honeypotnet.querylog import summarise
from honeypotnet.serve import BackgroundServer, Limits, ServedModel, create_app
from honeypotnet.trigger import Trigger

CLASSES = [f"class{i}" for i in range(10)]


def infer_body(x: torch.Tensor, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.flatten().tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) >= {"error"} and isinstance(body["error"], str), body
    for w in words:
        assert w.lower() in body["error"].lower(), (w, body["error"])
    assert "traceback" not in r.text.lower()
    return body


def log_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT key, endpoint, images, status, input_sha256, latency_ms FROM queries ORDER BY id").fetchall()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-weight bundle and model file (serving does not care whether they are trained)."""
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(create_model("cnn_small", 10), d / "model.safetensors", "cnn_small", 10, CLASSES)
    protected = build_protected("cnn_small", 10, "residual", 32)
    save_bundle(d / "bundle", protected, Trigger.patch(32, 6), arch="cnn_small", target=0, classes=CLASSES,
                verification={"tau0": 0.05})
    return d


@pytest.fixture(scope="module")
def server(tiny):
    """The bundle served openly, small limits so the limit tests stay small."""
    app = create_app(tiny / "bundle", name="hp", log_path=tiny / "open.db", limits=Limits(max_batch=8, max_body_mb=0.5))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# ----------------------------------------------------------------------------- protocol


def test_health_and_metadata(client, tiny):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/hp").json()
    assert meta["name"] == "hp" and meta["platform"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["classes"] == CLASSES and meta["parameters"]["max_batch"] == 8
    assert client.get("/v2/models/hp/ready").json()["ready"] is True
    assert_error(client.get("/v2/models/nope"), 404, "unknown model", "nope")
    assert_error(client.get("/v3/whatever"), 404, "no such endpoint")
    assert_error(client.get("/v2/models/hp/infer"), 405, "not allowed")
    # nothing the API says gives the protection away: a plain model's metadata looks the same
    with BackgroundServer(create_app(tiny / "model.safetensors", name="hp", limits=Limits(max_batch=8, max_body_mb=0.5))) as plain:
        plain_meta = httpx.get(plain.url + "/v2/models/hp").json()
        assert plain_meta == meta
        assert httpx.get(plain.url + "/v2").json() == client.get("/v2").json()
    assert "honeypot" not in json.dumps(meta).lower() + client.get("/v2").text.lower()


def test_infer_matches_the_model_in_process(client, tiny):
    model = load_bundle(tiny / "bundle").model
    x = torch.rand(5, 3, 32, 32)
    expected = torch.softmax(model(x), 1)
    for nested in (False, True):
        r = client.post("/v2/models/hp/infer", json=infer_body(x, nested, id="req-7"))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["id"] == "req-7" and out["model_name"] == "hp"
        (o,) = out["outputs"]
        assert o["name"] == "probabilities" and o["datatype"] == "FP32" and o["shape"] == [5, 10]
        assert torch.allclose(torch.tensor(o["data"]).view(5, 10), expected, atol=1e-6)
    # the HTTP oracle's compact encoding is exact for float32
    r = client.post("/v2/models/hp/infer", content=encode_request(x), headers={"content-type": "application/json"})
    assert torch.allclose(torch.tensor(r.json()["outputs"][0]["data"]).view(5, 10), expected, atol=1e-6)


def _good(n=1):
    return infer_body(torch.rand(n, 3, 32, 32))


def _with(**kw) -> dict:
    body = _good()
    body["inputs"][0].update(kw)
    return body


BAD_REQUESTS = [
    # (id, body (dict -> JSON, bytes -> raw), status, words in the error)
    ("not-json", b"{not json", 400, ["not valid json"]),
    ("json-list", [1, 2], 422, ["inputs"]),
    ("no-inputs", {"id": "x"}, 422, ["exactly one tensor"]),
    ("two-inputs", {"inputs": [_good()["inputs"][0]] * 2}, 422, ["exactly one tensor", "2"]),
    ("dtype-int8", _with(datatype="INT8"), 422, ["FP32", "INT8"]),
    ("dtype-missing", _with(datatype=None), 422, ["FP32"]),
    ("shape-3d", _with(shape=[3, 32, 32]), 422, ["shape"]),
    ("shape-gray", {"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.5] * 1024}]}, 422, ["[N, 3, 32, 32]"]),
    ("shape-size", {"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5] * 768}]}, 422, ["[N, 3, 32, 32]", "16"]),
    ("shape-float", _with(shape=[1.0, 3, 32, 32]), 422, ["integers"]),
    ("data-short", _with(data=[0.5] * 100), 422, ["100 values", "3072"]),
    ("data-ragged", _with(data=[[0.5] * 3, [0.5]]), 422, ["rectangular"]),
    ("data-strings", _with(data=["0.5"] * 3072), 422, ["numbers"]),
    ("data-bools", _with(data=[True] * 3072), 422, ["numbers"]),
    ("data-missing", _with(data=None), 422, ["data"]),
    ("nested-wrong", _with(data=torch.rand(1, 32, 32, 3).tolist()), 422, ["nested", "[1, 32, 32, 3]"]),
    ("nan", None, 422, ["NaN/inf"]),  # body built as text below: JSON has no NaN literal
    ("inf", None, 422, ["NaN/inf"]),
    ("above-1", infer_body(torch.rand(1, 3, 32, 32) * 255), 422, ["[0, 1]", "max"]),
    ("negative", infer_body(torch.rand(1, 3, 32, 32) - 0.5), 422, ["[0, 1]", "min"]),
    ("empty-batch", {"inputs": [{"name": "input", "shape": [0, 3, 32, 32], "datatype": "FP32", "data": []}]}, 422, ["empty batch"]),
    ("batch-over-max", {"inputs": [{"name": "input", "shape": [9, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 10}]}, 413, ["9 images", "8"]),
    ("unknown-output", {**_good(), "outputs": [{"name": "logits"}]}, 422, ["logits", "probabilities"]),
]


@pytest.mark.parametrize("case, body, status, words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_infer_requests_are_4xx_with_a_reason(client, case, body, status, words):
    if case in ("nan", "inf"):
        data = ",".join(["0.5"] * 3071 + ["NaN" if case == "nan" else "1e999"])
        raw = ('{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32","data":[%s]}]}' % data).encode()
    else:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v2/models/hp/infer", content=raw, headers={"content-type": "application/json"})
    assert_error(r, status, *words)
    assert client.get("/v2/health/ready").status_code == 200


def test_unknown_model_and_binary_extension(client):
    assert_error(client.post("/v2/models/other/infer", json=_good()), 404, "unknown model", "other", "hp")
    r = client.post("/v2/models/hp/infer", content=b"\0" * 10, headers={"Inference-Header-Content-Length": "5"})
    assert_error(r, 400, "not valid JSON")


def _raw_request(port: int, head: str, parts: list[bytes]) -> tuple[int, dict]:
    """Send a request by hand (headers, then body parts) and read the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head.encode())
        for p in parts:
            try:
                s.sendall(p)
            except (BrokenPipeError, ConnectionResetError):
                break
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read())


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    # Content-Length says 100 MB; only 100 bytes follow: the answer comes without waiting for the rest
    t = time.monotonic()
    status, body = _raw_request(server.port, "POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                f"Content-Length: {100 * 2**20}\r\n\r\n", [b"{" * 100])
    assert status == 413 and "exceeds the limit" in body["error"] and str(100 * 2**20) in body["error"]
    assert time.monotonic() - t < 10
    # no Content-Length (chunked): the stream is cut as soon as it passes the limit (0.5 MB here)
    limit = 2**19
    chunk = b"[" * 2**15
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (limit // len(chunk)) + [b"1\r\n[\r\n"]
    status, body = _raw_request(server.port, "POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                "Transfer-Encoding: chunked\r\n\r\n", parts)
    assert status == 413 and "exceeds the limit" in body["error"]
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def _png(w: int, h: int, color=(200, 30, 30), fmt="PNG") -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (w, h), color if fmt != "GIF" else 3).save(b, fmt)
    return b.getvalue()


def test_predict_endpoint_takes_image_files(client, tiny):
    files = [("file", ("a.png", _png(50, 40), "image/png")), ("file", ("b.jpg", _png(32, 32, fmt="JPEG"), "image/jpeg")),
             ("other", ("c.gif", _png(8, 90, fmt="GIF"), "image/gif"))]
    r = client.post("/v1/models/hp:predict?top_k=3", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["file"] for p in preds] == ["a.png", "b.jpg", "c.gif"]
    for p in preds:
        assert 1 <= len(p["top"]) <= 3 and all(t["class"] == CLASSES[t["index"]] for t in p["top"])
        assert [t["score"] for t in p["top"]] == sorted((t["score"] for t in p["top"]), reverse=True)
    # the same decoding in-process gives the same top-1
    from PIL import Image

    im = Image.open(io.BytesIO(_png(50, 40))).convert("RGB").resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    assert preds[0]["top"][0]["index"] == int(load_bundle(tiny / "bundle").model(x).argmax())


@pytest.mark.parametrize("files, data, query, status, words", [
    ([("file", ("bad.png", b"this is not an image", "image/png"))], None, "", 422, ["bad.png", "not a decodable image"]),
    ([("file", ("trunc.png", _png(40, 40)[:60], "image/png"))], None, "", 422, ["trunc.png"]),
    ([("file", ("empty.png", b"", "image/png"))], None, "", 422, ["empty"]),
    ([("note", (None, b"just text"))], None, "", 422, ["no image files"]),
    ([("file", (f"{i}.png", _png(4, 4), "image/png")) for i in range(9)], None, "", 413, ["too many files", "8"]),
    ([("file", ("a.png", _png(4, 4), "image/png"))], None, "?top_k=zero", 422, ["top_k"]),
])
def test_predict_bad_uploads(client, files, data, query, status, words):
    r = client.post(f"/v1/models/hp:predict{query}", files=files, data=data)
    assert_error(r, status, *words)


def test_predict_needs_multipart(client):
    assert_error(client.post("/v1/models/hp:predict", json={"x": 1}), 415, "multipart")
    assert_error(client.post("/v1/models/nope:predict", files=[("file", ("a.png", _png(4, 4), "image/png"))]), 404, "unknown model")


def test_output_mode_is_applied_server_side(tiny):
    model = load_bundle(tiny / "bundle").model
    x = torch.rand(4, 3, 32, 32)
    with BackgroundServer(create_app(tiny / "bundle", name="hp", output=OutputMode("label"))) as srv:
        meta = httpx.get(srv.url + "/v2/models/hp").json()
        assert meta["outputs"][0]["name"] == "label_onehot" and meta["parameters"]["output_mode"] == "label"
        out = httpx.post(srv.url + "/v2/models/hp/infer", json=infer_body(x)).json()["outputs"][0]
        assert out["name"] == "label_onehot"
        assert torch.equal(torch.tensor(out["data"]).view(4, 10), OutputMode("label").apply(torch.softmax(model(x), 1)))
        # a client asking for the probabilities is told they are not available
        r = httpx.post(srv.url + "/v2/models/hp/infer", json={**infer_body(x), "outputs": [{"name": "probabilities"}]})
        assert_error(r, 422, "label_onehot")


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 3:
            raise RuntimeError("boom in /secret/path/model.py")
        return torch.zeros(len(x), 10)


def test_unexpected_errors_are_a_json_500_without_traceback(tmp_path):
    served = ServedModel("m", _Broken(), 10, CLASSES, 32)
    with BackgroundServer(create_app(served, log_path=tmp_path / "q.db")) as srv:
        r = httpx.post(srv.url + "/v2/models/m/infer", json=infer_body(torch.rand(3, 3, 32, 32)))
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert httpx.post(srv.url + "/v2/models/m/infer", json=infer_body(torch.rand(2, 3, 32, 32))).status_code == 200
    assert [row[3] for row in log_rows(tmp_path / "q.db")] == [500, 200]


# ----------------------------------------------------------------------------- keys, quotas, rates, log


def test_keys_cli_stores_only_hashes(tmp_path, capsys):
    kf = tmp_path / "keys.json"
    assert main(["keys", "add", "alice", "--keys", str(kf), "--quota", "100"]) == 0
    token = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", token)
    text = kf.read_text()
    assert token not in text and hash_token(token) in text
    assert oct(kf.stat().st_mode & 0o777) == "0o600"
    (key,) = read_keys(kf)
    assert key.name == "alice" and key.quota == 100
    assert main(["keys", "add", "alice", "--keys", str(kf)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "add", "anonymous", "--keys", str(kf)]) == 2
    assert main(["keys", "list", "--keys", str(kf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "alice"
    assert main(["keys", "set-quota", "alice", "--keys", str(kf)]) == 0
    assert read_keys(kf)[0].quota is None and hash_token(token) in kf.read_text()
    assert main(["keys", "remove", "alice", "--keys", str(kf)]) == 0
    assert read_keys(kf) == []
    kf.write_text("{broken")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        read_keys(kf)


def test_api_keys_and_quota(tiny, tmp_path):
    kf = tmp_path / "keys.json"
    big, small = add_key(kf, "big"), add_key(kf, "small", quota=10)
    db = tmp_path / "q.db"
    x8, x4, x2 = (infer_body(torch.rand(n, 3, 32, 32)) for n in (8, 4, 2))
    url = "/v2/models/hp/infer"
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, log_path=db, limits=Limits(max_batch=8))) as srv, \
            httpx.Client(base_url=srv.url) as c:
        auth = lambda t: {"Authorization": f"Bearer {t}"}  # noqa: E731
        assert c.get("/v2/health/ready").status_code == 200  # health needs no key
        r = assert_error(c.post(url, json=x2), 401, "missing API key", "Bearer")
        assert_error(c.post(url, json=x2, headers=auth("mk_wrong")), 401, "invalid API key")
        assert_error(c.post(url, json=x2, headers={"Authorization": f"Basic {big}"}), 401, "malformed")
        assert c.post(url, json=x2).headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v2/models/hp"), 401, "missing API key")
        assert c.get("/v2/models/hp", headers=auth(big)).status_code == 200
        assert c.post(url, json=x8, headers=auth(big)).status_code == 200
        assert_error(c.post(url.replace("hp", "zz"), json=x2, headers=auth(big)), 404, "unknown model")
        # the quota counts images, not requests
        assert c.post(url, json=x8, headers=auth(small)).status_code == 200
        r = c.post(url, json=x4, headers=auth(small))
        body = assert_error(r, 429, "quota", "small", "8 of 10", "2 left")
        assert int(r.headers["retry-after"]) > 0 and body["quota"] == 10 and body["used"] == 8
        assert c.post(url, json=x2, headers=auth(small)).status_code == 200
        assert_error(c.post(url, json=x2, headers=auth(small)), 429, "quota")
        # a bad request costs nothing
        assert_error(c.post(url, content=b"{", headers={**auth(big), "content-type": "application/json"}), 400, "json")
        # a key added while the server runs works without a restart (the key file is re-read at most once a second)
        late = add_key(kf, "late")
        # (401 until then; 429 should this address run out of failed authentications meanwhile)
        assert _until(lambda: c.post(url, json=x2, headers=auth(late)), (401, 429)).status_code == 200
    # quotas survive a restart: they are counted from the query log
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, log_path=db)) as srv:
        r = httpx.post(srv.url + url, json=infer_body(torch.rand(1, 3, 32, 32)), headers={"Authorization": f"Bearer {small}"})
        assert_error(r, 429, "10 of 10")
        # ... until the operator raises the quota
        assert main(["keys", "set-quota", "small", "--keys", str(kf), "--quota", "12"]) == 0
        r = _until(lambda: httpx.post(srv.url + url, json=infer_body(torch.rand(2, 3, 32, 32)),
                                      headers={"Authorization": f"Bearer {small}"}), (429,))
        assert r.status_code == 200
    rows = log_rows(db)
    assert {r[0] for r in rows} == {"big", "small", "late"}  # failed authentications are counted, not rows
    assert summarise(db)["auth_failures"]["total"] >= 5
    assert sum(r[2] for r in rows if r[0] == "small" and r[3] == 200) == 12


def _until(send, waiting: tuple[int, ...], deadline: float = 30.0) -> httpx.Response:
    """Send again every 0.1 s while the answer's status is in `waiting` (the server has not re-read its
    key file yet); the first other answer is returned. `deadline` only guards against a hang: the key
    file is re-read at most once a second, so a working server answers within about a second."""
    end = time.monotonic() + deadline
    while True:
        r = send()
        if r.status_code not in waiting or time.monotonic() > end:
            return r
        time.sleep(0.1)


def test_rate_limit_and_the_http_oracle_honours_retry_after(tiny, tmp_path):
    limits = Limits(rate=1, burst=1)
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=limits, log_path=tmp_path / "q.db")) as srv:
        url = srv.url + "/v2/models/hp/infer"
        assert httpx.post(url, json=_good()).status_code == 200
        r = httpx.post(url, json=_good())
        body = assert_error(r, 429, "rate limit", "anonymous")
        assert r.headers["retry-after"] == "1" and 0 < body["retry_after"] <= 1
        time.sleep(body["retry_after"] + 0.05)
        assert httpx.post(url, json=_good()).status_code == 200
    # images per second: a batch costs its size. The bucket holds one batch (burst 8) and refills it in
    # `refill` seconds, at least 5x the longest of a few measured requests: every batch after the first
    # finds the bucket short by most of a batch, is answered 429 once and passes after the Retry-After wait
    refill = max(0.5, 5 * _request_seconds(tiny, batch=8))
    db = tmp_path / "rate.db"
    limits = Limits(rate=8 / refill, burst=8, rate_unit="images", max_batch=8)
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=limits, log_path=db)) as srv:
        oracle = HttpOracle(srv.url + "/v2/models/hp", batch_size=8)
        x = torch.rand(40, 3, 32, 32)
        t = time.monotonic()
        out = oracle(x)
        elapsed = time.monotonic() - t
        rows = log_rows(db)
    # a lower bound from the token bucket alone (the first 8 images from the bucket, 32 at the rate)
    assert elapsed >= 0.99 * 32 / limits.rate
    # every request the oracle counted reached the server (the metadata GET is not in the query log) ...
    assert oracle.requests == 1 + len(rows)
    # ... exactly: 5 batches of 8 answered, the 4 after the first each refused once before
    assert [(r[2], r[3]) for r in rows] == [(8, 200)] + [(8, 429), (8, 200)] * 4
    assert oracle.requests == 10 and oracle.queries == 40
    expected = torch.softmax(load_bundle(tiny / "bundle").model(x), 1)
    assert torch.allclose(out, expected, atol=1e-6)


def _request_seconds(tiny: Path, batch: int, repeats: int = 3) -> float:
    """The longest of `repeats` HTTP oracle requests of `batch` images to an unlimited server, in seconds
    (encoding, parsing, the forward pass and the answer: what a request costs between two rate checks)."""
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=Limits(max_batch=batch))) as srv:
        oracle = HttpOracle(srv.url + "/v2/models/hp", batch_size=batch)
        x = torch.rand(batch, 3, 32, 32)
        times = []
        for _ in range(repeats):
            t = time.monotonic()
            oracle(x)
            times.append(time.monotonic() - t)
        oracle.close()
    return max(times)


def test_query_log_keeps_every_request_under_concurrency(tiny, tmp_path, capsys):
    db = tmp_path / "q.db"
    kf = tmp_path / "keys.json"
    tokens = {name: add_key(kf, name) for name in ("thief", "user")}
    per_client, clients = 6, 8
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, log_path=db, limits=Limits(max_batch=8))) as srv:
        def work(i: int) -> list[int]:
            name = "thief" if i < 6 else "user"
            n = 4 if name == "thief" else 1
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens[name]}"}) as c:
                return [c.post("/v2/models/hp/infer", json=infer_body(torch.rand(n, 3, 32, 32))).status_code for _ in range(per_client)]

        with ThreadPoolExecutor(clients) as pool:
            statuses = [s for lst in pool.map(work, range(clients)) for s in lst]
        assert statuses == [200] * (clients * per_client)
        rows = log_rows(db)  # read while the server runs (WAL: readers do not block the writer)
    assert len(rows) == clients * per_client
    assert sum(r[2] for r in rows if r[0] == "thief") == 6 * per_client * 4
    assert all(r[1] == "infer" and r[3] == 200 and len(r[4]) == 64 and r[5] > 0 for r in rows)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s = summarise(db, bucket="minute", heavy_share=0.5)
    assert s["requests"] == 48 and s["images"] == 6 * 6 * 4 + 2 * 6
    keys = {k["key"]: k for k in s["keys"]}
    assert keys["thief"]["heavy"] and not keys["user"]["heavy"] and s["heavy"] == ["thief"]
    assert keys["thief"]["images"] == 144 and keys["user"]["requests"] == 12
    assert sum(b["images"] for b in s["buckets"]) == s["images"]
    assert main(["log", str(db), "--json", "--bucket", "hour"]) == 0
    assert json.loads(capsys.readouterr().out)["heavy"] == ["thief"]
    assert main(["log", str(db)]) == 0
    out = capsys.readouterr().out
    assert "HEAVY" in out and "thief" in out and "heavy querier 'thief'" in out
    assert main(["log", str(tmp_path / "missing.db")]) == 2


def _start_subprocess_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "honeypotnet.cli", "serve", *args, "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        m = re.search(r"listening on (http://\S+)/v2/models/", line)
        url = m.group(1) if m else None
        assert time.monotonic() < deadline
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_query_log_survives_kill_9(tiny, tmp_path):
    db = tmp_path / "q.db"
    proc, url = _start_subprocess_server([str(tiny / "bundle"), "--name", "hp", "--log", str(db)])
    try:
        answered = 0
        with httpx.Client(base_url=url) as c:
            for i in range(12):
                r = c.post("/v2/models/hp/infer", json=infer_body(torch.rand(1 + i % 3, 3, 32, 32)))
                answered += r.status_code == 200
            with ThreadPoolExecutor(4) as pool:
                answered += sum(pool.map(lambda _: httpx.post(url + "/v2/models/hp/infer", json=_good()).status_code == 200, range(8)))
        assert answered == 20
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    rows = log_rows(db)
    assert len(rows) == answered and all(r[3] == 200 for r in rows)
    assert sum(r[2] for r in rows) == sum(1 + i % 3 for i in range(12)) + 8


# ----------------------------------------------------------------------------- the HTTP oracle


def test_http_oracle_matches_the_local_oracle(server, tiny):
    x = torch.rand(19, 3, 32, 32)
    local = ModelOracle(load_bundle(tiny / "bundle").model)(x)
    with HttpOracle(server.url + "/v2/models/hp/infer", batch_size=5) as oracle:
        assert oracle.num_classes == 10 and oracle.image_size == 32 and oracle.classes == CLASSES
        assert oracle.batch_size == 5
        out = oracle(x)
        assert oracle.queries == 19 and oracle.requests == 1 + 4  # metadata + ceil(19/5) batches
        assert torch.allclose(out, local, atol=1e-6)
        assert torch.equal(oracle.predict_labels(x, batch_size=7), local.argmax(1))
        with pytest.raises(ValueError, match="32x32"):
            oracle(torch.rand(1, 3, 16, 16))
    # the server's max batch (8) caps the client's
    assert HttpOracle(server.url + "/v2/models/hp").batch_size == 8
    # a versioned model URL works the same
    with HttpOracle(server.url + "/v2/models/hp/versions/1/infer", batch_size=5) as oracle:
        assert oracle.infer_url.endswith("/v2/models/hp/versions/1/infer")
        assert torch.allclose(oracle(x[:7]), local[:7], atol=1e-6)


def test_http_oracle_errors_are_clear(server, tiny):
    with pytest.raises(HttpOracleError, match="404.*unknown model 'nope'"):
        HttpOracle(server.url + "/v2/models/nope")
    with pytest.raises(HttpOracleError, match="not a v2 model URL"):
        HttpOracle(server.url + "/v1/models/hp")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(HttpOracleError, match="cannot reach"):
        HttpOracle(f"http://127.0.0.1:{port}/v2/models/hp", max_retries=1)
    kf = tiny / "oracle-keys.json"
    token = add_key(kf, f"k{time.time_ns()}", quota=3)
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf)) as srv:
        with pytest.raises(HttpOracleError, match="401.*missing API key"):
            HttpOracle(srv.url + "/v2/models/hp")
        oracle = HttpOracle(srv.url + "/v2/models/hp", api_key=token)
        oracle(torch.rand(3, 3, 32, 32))
        with pytest.raises(HttpOracleError, match="quota exhausted.*over max_wait"):
            oracle(torch.rand(1, 3, 32, 32))


# ----------------------------------------------------------------------------- end to end over loopback

@pytest.fixture(scope="module")
def trained(quick_demo) -> Path:
    """The quick demo's trained victim and its protected bundle (conftest `quick_demo`, built once per session)."""
    return quick_demo[0]


@pytest.mark.parametrize("served, stolen", [("bundle", True), ("victim.safetensors", False)], ids=["protected", "unprotected"])
def test_extract_and_verify_over_http(trained, tmp_path, served, stolen):
    """A thief extracts the served model over HTTP and serves its copy; the owner verifies it over HTTP.
    A copy of the protected bundle is flagged; a copy of the unprotected victim (an innocent model) is not;
    either way the verdict over HTTP equals the one computed in-process."""
    from honeypotnet.cli import build_parser
    from honeypotnet.cli.common import load_data
    from honeypotnet.verify import verify

    bundle = load_bundle(trained / "bundle")
    db = tmp_path / "q.db"
    sub = tmp_path / "substitute.safetensors"
    with BackgroundServer(create_app(trained / served, name="classifier", log_path=db)) as srv:
        rc = main(["extract", f"{srv.url}/v2/models/classifier", "--pool", "shapes:pool:1500", "--budget", "1200",
                   "--epochs", "6", "--output", str(sub)])
        assert rc == 0
    res = json.loads(sub.with_suffix(".json").read_text())
    assert res["queries"] == 1200
    rows = log_rows(db)
    assert sum(r[2] for r in rows) == 1200 and all(r[3] == 200 for r in rows)
    out = tmp_path / "verify.json"
    with BackgroundServer(create_app(sub, name="suspect")) as srv:
        argv = ["verify", str(trained / "bundle"), f"{srv.url}/v2/models/suspect", "--data", "shapes:test",
                "--data-limit", "400", "--json", str(out)]
        rc = main(argv)
    over_http = json.loads(out.read_text())
    assert rc == (0 if over_http["stolen"] else 1)  # the exit status is the verdict
    # the images the CLI verified on: its own data loading, on its own parse of the same arguments
    data = load_data(build_parser().parse_args(argv), "data", size=bundle.trigger.image_size)
    assert len(data) == 400
    local = verify(load_model(sub)[0], bundle.trigger, data.images, data.labels, bundle.target, bundle.tau0)
    assert over_http["verdict"] == local.verdict and over_http["stolen"] == local.stolen
    assert over_http["stolen"] is stolen, over_http
    assert over_http["n"] == local.n and abs(over_http["hits"] - local.hits) <= 2
    assert over_http["queries"] == 2 * local.n


# ----------------------------------------------------------------------------- hardening


def test_odd_top_k_and_request_ids_are_4xx_never_500(client):
    files = [("file", ("a.png", _png(4, 4), "image/png"))]
    for k in ("²", "1" * 5000, "٣", "-1", "0", "", " 3"):  # isdigit() accepts '²' and Arabic digits; int() refuses long strings
        assert_error(client.post("/v1/models/hp:predict", params={"top_k": k}, files=files), 422, "top_k")
    assert client.post("/v1/models/hp:predict?top_k=1000000", files=files).status_code == 200  # capped at K
    # a lone surrogate (valid JSON, not encodable as UTF-8) and non-string ids are refused before the forward pass
    raw = json.dumps(_good()).replace("{", '{"id": "\\ud800x", ', 1).encode()
    assert_error(client.post("/v2/models/hp/infer", content=raw, headers={"content-type": "application/json"}), 422, "id")
    for rid in (7, 1.5, [1], {"a": 1}, True, "x" * 2000):
        assert_error(client.post("/v2/models/hp/infer", json={**_good(), "id": rid}), 422, "id")
    r = client.post("/v2/models/hp/infer", json={**_good(), "id": "ünïcode ✓"})
    assert r.status_code == 200 and r.json()["id"] == "ünïcode ✓"


def test_failed_authentication_is_throttled_and_counted_not_logged_row_by_row(tiny, tmp_path):
    kf = tmp_path / "keys.json"
    good = add_key(kf, "good")
    db = tmp_path / "q.db"
    limits = Limits(auth_fail_rate=0.5, auth_fail_burst=5)
    url = "/v2/models/hp/infer"
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, log_path=db, limits=limits)) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as c:
        statuses = []
        for i in range(40):
            r = c.post(url, json=_good(), headers={"Authorization": f"Bearer mk_guess{i}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                body = assert_error(r, 429, "failed authentication")
                assert int(r.headers["retry-after"]) >= 1 and body["retry_after"] > 0
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 35, statuses
        # an address that is throttled waits, whatever it sends
        assert c.post(url, json=_good(), headers={"Authorization": f"Bearer {good}"}).status_code == 429
        assert c.get("/v2/models/hp").status_code == 429
        time.sleep(2.1)  # one token back at 0.5/s
        assert c.post(url, json=_good(), headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert [r[0] for r in log_rows(db)] == ["good"]  # no row per failed attempt
    s = summarise(db)
    assert s["requests"] == 1 and s["auth_failures"]["total"] == 42
    assert s["auth_failures"]["addresses"] == {"127.0.0.1": 42}


def test_no_heap_addresses_no_server_header_known_image_formats_only(client, tmp_path):
    r = client.post("/v1/models/hp:predict", files=[("file", ("bad.png", b"not an image at all", "image/png"))])
    assert_error(r, 422, "bad.png")
    assert "0x" not in r.text
    assert "server" not in r.headers and "uvicorn" not in str(r.headers).lower()
    assert "server" not in client.get("/v2/health/ready").headers
    # formats outside the list (here PPM, which PIL reads) are refused
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "PPM")
    assert_error(client.post("/v1/models/hp:predict", files=[("file", ("a.ppm", b.getvalue(), "image/x-ppm"))]), 422, "a.ppm")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"):
        assert client.post("/v1/models/hp:predict", files=[("file", ("a", _png(8, 8, fmt=fmt), "x/y"))]).status_code == 200, fmt


def test_json_endpoint_refuses_form_content_types(client):
    raw = json.dumps(_good()).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/v2/models/hp/infer", content=raw, headers=headers)
        assert_error(r, 415, "application/json")
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert client.post("/v2/models/hp/infer", content=raw, headers={"content-type": ctype}).status_code == 200


def test_query_log_is_private_to_its_owner(tiny, tmp_path):
    db = tmp_path / "q.db"
    with BackgroundServer(create_app(tiny / "bundle", name="hp", log_path=db)) as srv:
        assert httpx.post(srv.url + "/v2/models/hp/infer", json=_good()).status_code == 200
        for p in tmp_path.glob("q.db*"):
            assert oct(p.stat().st_mode & 0o777) == "0o600", p


def test_versioned_paths_and_the_input_name(client):
    assert client.get("/v2/models/hp/versions/1").json() == client.get("/v2/models/hp").json()
    assert client.get("/v2/models/hp/versions/1/ready").json()["ready"] is True
    x = torch.rand(2, 3, 32, 32)
    a = client.post("/v2/models/hp/versions/1/infer", json=infer_body(x)).json()
    b = client.post("/v2/models/hp/infer", json=infer_body(x)).json()
    assert a["outputs"] == b["outputs"] and a["model_version"] == "1"
    for path in ("/v2/models/hp/versions/2", "/v2/models/hp/versions/0/ready", "/v2/models/hp/versions/x"):
        assert_error(client.get(path), 404, "version")
    assert_error(client.post("/v2/models/hp/versions/2/infer", json=infer_body(x)), 404, "version")
    assert_error(client.post("/v2/models/zz/versions/1/infer", json=infer_body(x)), 404, "unknown model")
    body = infer_body(x)
    body["inputs"][0]["name"] = "images"
    assert_error(client.post("/v2/models/hp/infer", json=body), 400, "images", "'input'")
    del body["inputs"][0]["name"]
    assert_error(client.post("/v2/models/hp/infer", json=body), 400, "'input'")


def test_quota_is_checked_before_the_upload_is_read_or_decoded(tiny, tmp_path):
    kf = tmp_path / "keys.json"
    spent, two = add_key(kf, "spent", quota=0), add_key(kf, "two", quota=2)
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, limits=Limits(max_batch=8))) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as c:
        bad = [("file", ("bad.png", b"not an image", "image/png"))]
        # a spent key learns nothing about its upload: 429 at once, not a decoding error
        r = c.post("/v1/models/hp:predict", files=bad, headers={"Authorization": f"Bearer {spent}"})
        assert_error(r, 429, "quota", "0 of 0")
        assert_error(c.post("/v2/models/hp/infer", content=b"{", headers={"Authorization": f"Bearer {spent}",
                                                                          "content-type": "application/json"}), 429, "quota")
        # three files for a quota of two: refused before any is decoded
        three = [("file", (f"{i}.png", b"junk", "image/png")) for i in range(3)]
        assert_error(c.post("/v1/models/hp:predict", files=three, headers={"Authorization": f"Bearer {two}"}), 429, "quota", "3")
        assert c.post("/v1/models/hp:predict", files=[("file", ("a.png", _png(8, 8), "image/png"))] * 2,
                      headers={"Authorization": f"Bearer {two}"}).status_code == 200


def test_a_slow_body_gets_408_after_the_read_deadline(tiny):
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=Limits(read_timeout_s=1.0))) as srv:
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"inputs":')
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 408 and "deadline" in json.loads(resp.read())["error"]
            assert s.recv(10) == b""  # the server closed the connection
        assert time.monotonic() - t < 8
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200


def _binary_request(x: torch.Tensor, size: int | None = None, data: bytes | None = None, **extra) -> tuple[bytes, dict]:
    """A v2 request in the binary tensor extension, built by hand: JSON header, then raw little-endian FP32."""
    raw = x.numpy().astype("<f4").tobytes() if data is None else data
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}], **extra}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def test_binary_tensor_extension(client, tiny):
    model = load_bundle(tiny / "bundle").model
    x = torch.rand(5, 3, 32, 32)
    expected = torch.softmax(model(x), 1)
    # binary input, JSON output
    body, headers = _binary_request(x, id="b1")
    r = client.post("/v2/models/hp/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "b1" and torch.allclose(torch.tensor(out["outputs"][0]["data"]).view(5, 10), expected, atol=1e-6)
    # binary input and output (tritonclient's default: parameters.binary_data_output, or per output)
    for extra in ({"parameters": {"binary_data_output": True}},
                  {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}):
        body, headers = _binary_request(x, **extra)
        r = client.post("/v2/models/hp/versions/1/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        head = json.loads(r.content[:n])
        (o,) = head["outputs"]
        assert o["name"] == "probabilities" and o["shape"] == [5, 10] and o["parameters"]["binary_data_size"] == 5 * 10 * 4
        assert "data" not in o and len(r.content) == n + 200
        got = torch.from_numpy(__import__("numpy").frombuffer(r.content[n:], dtype="<f4").copy()).view(5, 10)
        assert torch.allclose(got, expected, atol=1e-6)
    # what is wrong with a binary request is said
    raw = x.numpy().astype("<f4").tobytes()
    body, headers = _binary_request(x)
    for length, words in (("abc", ["Inference-Header-Content-Length"]), (str(len(body) + 1), ["Inference-Header-Content-Length"]),
                          ("0", ["Inference-Header-Content-Length"])):
        assert_error(client.post("/v2/models/hp/infer", content=body, headers={**headers, "Inference-Header-Content-Length": length}), 400, *words)
    assert_error(client.post("/v2/models/hp/infer", content=body + b"xx", headers=headers), 400, "2 bytes")
    body, headers = _binary_request(x, size=len(raw) - 4)
    assert_error(client.post("/v2/models/hp/infer", content=body, headers=headers), 422, "binary_data_size", str(len(raw)))
    body, headers = _binary_request(x, size=len(raw), data=raw[:-4])  # the bytes fall short of what the header says
    assert_error(client.post("/v2/models/hp/infer", content=body, headers=headers), 400, "binary section", str(len(raw) - 4))
    body, headers = _binary_request(x, size=-1)
    assert_error(client.post("/v2/models/hp/infer", content=body, headers=headers), 422, "binary_data_size")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    body, headers = _binary_request(bad)
    assert_error(client.post("/v2/models/hp/infer", content=body, headers=headers), 422, "NaN")
    # 'data' and binary_data_size together are refused
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072,
                                   "parameters": {"binary_data_size": 12288}}]}).encode()
    r = client.post("/v2/models/hp/infer", content=head + raw[:12288], headers={"Inference-Header-Content-Length": str(len(head))})
    assert_error(r, 422, "both")


def test_a_slow_request_head_is_cut_off_too(tiny):
    """A connection that sends nothing, or its headers a byte at a time, is closed after the deadline."""
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=Limits(read_timeout_s=1.0))) as srv:
        def closed_after(first: bytes, trickle: bytes = b"") -> float:
            t = time.monotonic()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
                s.sendall(first)
                for b in trickle:  # one header byte every 0.2 s: never a whole head within the deadline
                    time.sleep(0.2)
                    try:
                        s.sendall(bytes([b]))
                    except (BrokenPipeError, ConnectionResetError):
                        break
                s.settimeout(15)
                try:
                    while s.recv(1024):
                        pass
                except ConnectionResetError:
                    pass
            return time.monotonic() - t

        assert closed_after(b"") < 6
        assert closed_after(b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 40) < 8
        # an answered request's keep-alive connection then also gets the deadline for its next head
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.post("/v2/models/hp/infer", json=_good()).status_code == 200
            time.sleep(0.5)
            assert c.post("/v2/models/hp/infer", json=_good()).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200


# ----------------------------------------------------------------------------- serve flags


def test_serve_flags_set_every_limit_and_refuse_meaningless_values(capsys):
    from dataclasses import fields

    from honeypotnet.cli import build_parser
    from honeypotnet.cli.serve import LIMIT_FLAGS, limits_from_args

    assert set(LIMIT_FLAGS.values()) == {f.name for f in fields(Limits)}  # every field has its flag
    parse = lambda *a: build_parser().parse_args(["serve", "m.safetensors", *a])  # noqa: E731
    assert limits_from_args(parse()) == Limits()  # no flag: the defaults
    args = parse("--max-batch", "4", "--max-body-mb", "0.5", "--quota", "0", "--rate", "2.5", "--burst", "3", "--rate-unit", "images",
                 "--read-timeout", "3", "--log-timeout", "0.5", "--auth-fail-rate", "0.2", "--auth-fail-burst", "7",
                 "--auth-log-interval", "0")
    assert limits_from_args(args) == Limits(max_batch=4, max_body_mb=0.5, quota=0, rate=2.5, burst=3, rate_unit="images",
                                            read_timeout_s=3, log_timeout_s=0.5, auth_fail_rate=0.2, auth_fail_burst=7,
                                            auth_log_interval_s=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split()).partition(" options: ")[2]
    for flag in LIMIT_FLAGS:
        option = r"(?:[A-Z]+|{[^}]*})"  # an option's line starts with its metavar (N, S, ...) or its choices
        line = re.search(rf"--{flag.replace('_', '-')} {option} (.*?)(?= --[a-z-]+ {option} |$)", help_text)
        assert line and "default" in line.group(1), flag  # each says what it does and its default
    for flag, value, words in [("--max-batch", "0", "a positive integer"), ("--max-batch", "2.5", "a positive integer"),
                               ("--max-body-mb", "-1", "a number > 0"), ("--quota", "-3", "an integer >= 0"),
                               ("--rate", "0", "a number > 0"), ("--rate", "nan", "a number > 0"), ("--burst", "0.5", "a number >= 1"),
                               ("--read-timeout", "0", "a number > 0"), ("--log-timeout", "inf", "a number > 0"),
                               ("--auth-fail-rate", "-1", "a number > 0"), ("--auth-fail-burst", "0", "a number >= 1"),
                               ("--auth-log-interval", "-1", "a number >= 0")]:
        with pytest.raises(SystemExit) as e:
            main(["serve", "m.safetensors", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: expected {words}, got '{value}'" in err, err
