"""The HTTP server, its keys, limits and query log, and the HTTP oracle: against a real uvicorn
server on 127.0.0.1 (a thread, or a subprocess for kill -9), never a mock.

The end-to-end test (serve bundle -> extract over HTTP -> serve substitute -> verify over HTTP)
needs a bundle whose backdoor transfers; it is trained once (small sizes, about 1-3 min on 2
CPU cores) and cached under pytest's cache dir, keyed by the sources that make it.
"""
from __future__ import annotations

import argparse
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
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from honeypotnet.apikeys import KeyFileError, add_key, hash_token, read_keys
from honeypotnet.bundle import load_bundle, load_model, save_bundle, save_model
from honeypotnet.cli import main
from honeypotnet.honeypot import Trigger, build_protected
from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.oracles_http import HttpOracle, HttpOracleError, encode_request
from honeypotnet.querylog import summarise
from honeypotnet.serve import BackgroundServer, Limits, ServedModel, create_app

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
    assert client.get("/v2").json()["extensions"] == []
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
    assert_error(r, 415, "binary")


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
        assert_error(c.post(url, content=b"{", headers=auth(big)), 400, "json")
        # a key added while the server runs works within a second or two, no restart
        late = add_key(kf, "late")
        time.sleep(1.1)
        assert c.post(url, json=x2, headers=auth(late)).status_code == 200
    # quotas survive a restart: they are counted from the query log
    with BackgroundServer(create_app(tiny / "bundle", name="hp", keys=kf, log_path=db)) as srv:
        r = httpx.post(srv.url + url, json=infer_body(torch.rand(1, 3, 32, 32)), headers={"Authorization": f"Bearer {small}"})
        assert_error(r, 429, "10 of 10")
        # ... until the operator raises the quota
        assert main(["keys", "set-quota", "small", "--keys", str(kf), "--quota", "12"]) == 0
        time.sleep(1.1)
        r = httpx.post(srv.url + url, json=infer_body(torch.rand(2, 3, 32, 32)), headers={"Authorization": f"Bearer {small}"})
        assert r.status_code == 200
    rows = log_rows(db)
    assert {r[0] for r in rows} == {"(unauthenticated)", "big", "small", "late"}
    assert sum(r[2] for r in rows if r[0] == "small" and r[3] == 200) == 12


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
    # images per second: a batch costs its size
    with BackgroundServer(create_app(tiny / "bundle", name="hp", limits=Limits(rate=20, rate_unit="images", max_batch=8))) as srv:
        oracle = HttpOracle(srv.url + "/v2/models/hp", batch_size=8)
        x = torch.rand(40, 3, 32, 32)
        t = time.monotonic()
        out = oracle(x)
        assert time.monotonic() - t >= (40 - 20) / 20 * 0.8  # the bucket (20) then 20 images/s
        assert oracle.requests > 5  # some 429s were retried
        expected = torch.softmax(load_bundle(tiny / "bundle").model(x), 1)
        assert torch.allclose(out, expected, atol=1e-6) and oracle.queries == 40


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

LOOP = dict(train=2500, victim_epochs=5, shadow=2000, outer_iters=2, shadow_epochs=2, honeypot_steps=150)


def _build_trained_bundle(out: Path) -> None:
    """A trained victim and its bundle (a small protect run; tau0 fixed at the calibration floor)."""
    from honeypotnet.data import load_dataset
    from honeypotnet.honeypot import ProtectConfig, protect
    from honeypotnet.training import FitConfig, fit

    train = load_dataset("shapes", split="train", n=LOOP["train"], seed=0)
    shadow = load_dataset("shapes", split="shadow", n=LOOP["shadow"], seed=0)
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10)
    fit(victim, train.images, train.labels, FitConfig(epochs=LOOP["victim_epochs"], seed=0))
    # the "spec" preset: the server is under test here, and the robust default's extra models (ResNet-20
    # negatives, fine-tuned copies) would multiply this fixture's time; the default has its own tests
    cfg = ProtectConfig.preset("spec", shadow_arch="cnn_small", outer_iters=LOOP["outer_iters"],
                               shadow_epochs=LOOP["shadow_epochs"], honeypot_steps=LOOP["honeypot_steps"], seed=0)
    res = protect(victim, shadow.images, train.images, cfg)
    save_model(victim, out / "victim.safetensors", "cnn_small", 10, train.classes)
    save_bundle(out / "bundle", res.model, res.trigger, arch="cnn_small", target=cfg.target, classes=train.classes,
                config=asdict(cfg), verification={"tau0": 0.05, "rule": "fixed for this test: the calibration floor"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small victim and its bundle, built once per test session (no state kept between runs)."""
    out = tmp_path_factory.mktemp("serve-loop")
    _build_trained_bundle(out)
    return out


@pytest.mark.parametrize("served, stolen", [("bundle", True), ("victim.safetensors", False)], ids=["protected", "unprotected"])
def test_extract_and_verify_over_http(trained, tmp_path, served, stolen):
    """A thief extracts the served model over HTTP and serves its copy; the owner verifies it over HTTP.
    A copy of the protected bundle is flagged; a copy of the unprotected victim (an innocent model) is not;
    either way the verdict over HTTP equals the one computed in-process."""
    from honeypotnet.cli import _load
    from honeypotnet.verify import verify

    bundle = load_bundle(trained / "bundle")
    db = tmp_path / "q.db"
    sub = tmp_path / "substitute.safetensors"
    with BackgroundServer(create_app(trained / served, name="classifier", log_path=db)) as srv:
        rc = main(["extract", f"{srv.url}/v2/models/classifier", "--pool-limit", "1500", "--budget", "1200",
                   "--epochs", "6", "--eval", "", "--output", str(sub)])
        assert rc == 0
    res = json.loads(sub.with_suffix(".json").read_text())
    assert res["queries"] == 1200
    rows = log_rows(db)
    assert sum(r[2] for r in rows) == 1200 and all(r[3] == 200 for r in rows)
    out = tmp_path / "verify.json"
    with BackgroundServer(create_app(sub, name="suspect")) as srv:
        rc = main(["verify", str(trained / "bundle"), f"{srv.url}/v2/models/suspect", "--data-limit", "400", "--json", str(out)])
        assert rc == 0
    over_http = json.loads(out.read_text())
    data = _load(argparse.Namespace(data="shapes", data_root=None, data_split="test", data_limit=400), "data", size=32)
    local = verify(load_model(sub)[0], bundle.trigger, data.images, data.labels, bundle.target, bundle.tau0)
    assert over_http["verdict"] == local.verdict and over_http["stolen"] == local.stolen
    assert over_http["stolen"] is stolen, over_http
    assert over_http["n"] == local.n and abs(over_http["hits"] - local.hits) <= 2
    assert over_http["queries"] == 2 * local.n
