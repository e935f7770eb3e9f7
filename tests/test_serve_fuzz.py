"""Fuzzing the HTTP server on 127.0.0.1: well over a thousand malformed, odd or hostile requests
(bad JSON, framing, shapes, datatypes, NaN/inf, batch limits, oversized images, odd encodings,
model names, Authorization variants), from a fixed seed so a failure reproduces.

It asserts that no answer is a 5xx, that no request hangs (every client has a timeout and the
whole run a time bound), and that the server still answers a correct request correctly after
it: the same probabilities as the model in-process.
"""
from __future__ import annotations

import http.client
import io
import json
import random
import socket
import struct
import time
import zlib

import httpx
import pytest
import torch

from honeypotnet.apikeys import add_key
from honeypotnet.bundle import load_bundle, save_bundle
from honeypotnet.head import build_protected
from honeypotnet.serve import BackgroundServer, Limits, create_app
from honeypotnet.trigger import Trigger

SEED = 20261204
MAX_BATCH = 4
TIME_BOUND_S = 50.0  # the whole run; each request has a client timeout besides
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_bundle(d / "bundle", build_protected("cnn_small", 10, "residual", 32), Trigger.patch(32, 6), arch="cnn_small",
                target=0, classes=CLASSES, verification={"tau0": 0.05})
    token = add_key(d / "keys.json", "fuzzer")
    limits = Limits(max_batch=MAX_BATCH, max_body_mb=0.25, read_timeout_s=2.0, auth_fail_burst=1e6, auth_fail_rate=1e6)
    app = create_app(d / "bundle", name="hp", keys=d / "keys.json", log_path=d / "q.db", limits=limits)
    with BackgroundServer(app) as srv:
        yield srv, token, d


# ----------------------------------------------------------------------------- request generators


def _png(w: int, h: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(b, fmt)
    return b.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A 1x1 PNG whose header claims w x h pixels (a decompression bomb's header, without the bomb)."""
    data = bytearray(_png(1, 1))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


ODD_VALUES = [None, True, False, 0, -1, 1, 2**64, -(2**63), 1e308, -1e-308, 0.5, "", "x", "FP32", "\u00e9", "\ud800",
              [], [[]], {}, {"a": 1}, [None], ["1"], [1.5], [[1, 2], [3]], "NaN", [True] * 4]


def _valid(rng: random.Random, n: int = 1) -> dict:
    return {"inputs": [{"name": "input", "shape": [n, 3, 32, 32], "datatype": "FP32",
                        "data": [round(rng.random(), 3) for _ in range(n * 3072)]}]}


def _json_case(rng: random.Random) -> bytes:
    body = _valid(rng)
    t = body["inputs"][0]
    kind = rng.randrange(12)
    if kind == 0:
        t[rng.choice(["name", "shape", "datatype", "data", "parameters"])] = rng.choice(ODD_VALUES)
    elif kind == 1:
        del t[rng.choice(["name", "shape", "datatype", "data"])]
    elif kind == 2:
        t["shape"] = [rng.choice([-1, 0, 1, 2, 3, 5, 32, 33, 2**31, 10**20, 1.0, "3", None]) for _ in range(rng.randrange(0, 7))]
    elif kind == 3:
        t["datatype"] = rng.choice(["FP16", "FP64", "INT8", "UINT8", "BYTES", "BOOL", "fp32", "FP32 ", "", "\x00"])
    elif kind == 4:
        n = rng.choice([0, MAX_BATCH + 1, 10**6, 2**40])
        t["shape"] = [n, 3, 32, 32]
    elif kind == 5:
        body = rng.choice(ODD_VALUES)
    elif kind == 6:
        body["inputs"] = rng.choice(ODD_VALUES + [[t, t], [None], [[t]]])
    elif kind == 7:
        body["id"] = rng.choice(ODD_VALUES + ["ok-id", "a" * 300, "\ud800\udfff", "\udfff"])
    elif kind == 8:
        body["outputs"] = rng.choice(ODD_VALUES + [[{"name": "probabilities"}], [{"name": 3}], [{"nom": "x"}]])
    elif kind == 9:
        t["data"] = [rng.choice([-0.0, 1.0000001, -1e-9, 255, 1e-320, 0.5]) for _ in range(3072)]
    elif kind == 10:
        t["data"] = [[[rng.random() for _ in range(32)] for _ in range(32)] for _ in range(rng.choice([2, 3, 4]))]
    else:
        body["parameters"] = {"binary_data_output": True, "x": [1] * 10}
    return json.dumps(body).encode()


def _raw_case(rng: random.Random) -> bytes:
    valid = json.dumps(_valid(rng)).encode()
    kind = rng.randrange(12)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:
        return valid[: rng.randrange(len(valid))]
    if kind == 2:
        return b"[" * rng.choice([1000, 100_000, 200_000])
    if kind == 3:
        return b"\xef\xbb\xbf" + valid
    if kind == 4:
        return valid.decode().encode(rng.choice(["utf-16", "utf-32", "utf-16-le"]))
    if kind == 5:
        return valid.replace(b"0.", b"\xff.", 1)
    if kind == 6:
        return valid.replace(b'"data": [', b'"data": [NaN, ' if rng.random() < 0.5 else b'"data": [1e999, ', 1)
    if kind == 7:
        return valid.replace(b'"data": [', b'"data": [-Infinity, Infinity, ', 1)
    if kind == 8:
        return b'{"inputs": [{"name": "input", "shape": [1,3,32,32], "datatype": "FP32", "data": [' + b"1" * 5000 + b"]}]}"
    if kind == 9:
        return b'{"inputs": [' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]}"
    if kind == 10:
        return b'{"id": "\\ud800", "inputs": 1}'
    return b" " * rng.randrange(0, 1000)


def _files_case(rng: random.Random) -> tuple[list, str]:
    kind = rng.randrange(10)
    name = rng.choice(["a.png", "", "\u00e9\u00e8.png", "x" * 500, "../../etc/passwd", "a\x7fb.png", "\u202etxt.png", "a;b\".png"])
    if kind == 0:
        files = [("file", (name, _png_claiming(rng.choice([6000, 20000, 70000]), rng.choice([6000, 20000, 70000])), "image/png"))]
    elif kind == 1:
        files = [("file", (name, _png(rng.choice([1, 2, 31, 300]), rng.choice([1, 5, 64]), rng.choice(["PNG", "BMP", "TIFF", "WEBP"])), "image/png"))]
    elif kind == 2:
        files = [("file", (name, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), "image/png"))]
    elif kind == 3:
        files = [("file", (f"{i}.png", _png(4, 4), "image/png")) for i in range(rng.choice([MAX_BATCH, MAX_BATCH + 1, 40]))]
    elif kind == 4:
        files = [("file", (name, _png(8, 8)[: rng.randrange(8, 60)], "image/png"))]
    elif kind == 5:
        files = [("file", (name, b"GIF89a" + bytes(rng.randrange(256) for _ in range(50)), "image/gif"))]
    elif kind == 6:
        files = [("file", (name, b"", "application/octet-stream"))]
    elif kind == 7:
        files = [("f\u00e9ld", (name, _png(3, 3), "text/plain"))]
    elif kind == 8:
        files = [("file", (name, b"P6\n3 3\n255\n" + b"\x00" * 27, "image/x-portable-pixmap"))]
    else:
        files = [("file", (name, _png(5, 5, "JPEG"), "image/jpeg"))]
    query = rng.choice(["", "?top_k=3", "?top_k=0", "?top_k=-2", "?top_k=%C2%B2", "?top_k=" + "9" * 3000, "?top_k=1e3",
                        "?top_k=%00", "?top_k=5&top_k=x", "?top_k=99999999999"])
    return files, query


PATHS = ["/v2/models/hp/infer", "/v2/models/hp/versions/1/infer", "/v2/models/hp/versions/2/infer", "/v2/models/HP/infer",
         "/v2/models/hp%00/infer", "/v2/models/%2e%2e/infer", "/v2/models/h\u00e9/infer", "/v2/models/" + "h" * 3000 + "/infer",
         "/v2/models//infer", "/v2/models/hp/infer/", "/v2/models/hp/versions//infer", "/v1/models/hp:predict",
         "/v1/models/hp%3Apredict", "/v2/models/hp", "/v2/models/hp/ready", "/v2/models/hp/versions/1/ready", "/v2//models"]


def _auth_variants(token: str) -> list[dict]:
    return [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  x"}, {"Authorization": f"bearer {token}"},
            {"Authorization": f"Bearer  {token}"}, {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"},
            {"Authorization": "Bearer " + "A" * 8000}, {"Authorization": f"Bearer {token} extra"}, {"Authorization": "Bearer \u00ff\u00fe".encode("latin-1")},
            {"Authorization": f"Token {token}"}, {"Authorization": f"Bearer\t{token}"}]


def _raw_http(port: int, request: bytes, timeout: float = 10.0) -> int | None:
    """Send raw bytes; the status of the answer, or None if the server closed without one. A hang raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR) if request.endswith(b"#close") else None
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = http.client.HTTPResponse(s)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
            return None
        resp.read()
        return resp.status


FRAMING = [
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}",
    "POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \u00b2\r\n\r\n{}".encode("utf-8"),
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{}#close",
    b"POST /v2/models/hp/infer HTTP/1.0\r\nContent-Type: application/json\r\n\r\n{}#close",
    b"POST /v2/models/hp/infer HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX: \x00\x01\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/models/hp:predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\nContent-Length: 10\r\n\r\n0123456789",
    b"POST /v1/models/hp:predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\nContent-Length: 30\r\n\r\n--zz\r\nContent-Disposition: form\r\n\r\n",
    b"POST /v1/models/hp:predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=\r\nContent-Length: 4\r\n\r\n----",
    b"GET /v2/models/hp?x=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/models/\xff\xfe/ready HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/models/hp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n\r\n",
    b"GET /v2/models/hp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n\r\n",
    b"GET /v2/models/hp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    b"OPTIONS /v2/models/hp/infer HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n",
]


# ----------------------------------------------------------------------------- the run


def test_fuzz_no_5xx_no_hang_and_a_correct_answer_after(served):
    srv, token, d = served
    rng = random.Random(SEED)
    auth = {"Authorization": f"Bearer {token}"}
    statuses: dict[int | None, int] = {}
    fives: list[str] = []
    start = time.monotonic()

    def note(status: int | None, what: str) -> None:
        statuses[status] = statuses.get(status, 0) + 1
        if status is not None and status >= 500:
            fives.append(f"{status}: {what[:200]}")

    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(1100):
            assert time.monotonic() - start < TIME_BOUND_S, f"fuzz run over {TIME_BOUND_S} s after {i} requests"
            kind = i % 10
            if kind in (0, 1, 2):
                body = _json_case(rng)
                r = c.post(rng.choice(PATHS[:3]), content=body, headers={**auth, "content-type": "application/json"})
                what = body[:200].decode("utf-8", "replace")
            elif kind in (3, 4):
                body = _raw_case(rng)
                ctype = rng.choice(["application/json", "application/json; charset=utf-16", "text/plain", "application/octet-stream"])
                headers = {**auth, "content-type": ctype}
                if rng.random() < 0.3:  # the binary tensor extension's framing, mostly wrong
                    headers["Inference-Header-Content-Length"] = rng.choice(["0", "1", "-1", "x", "\u00b2".encode("latin-1"), "9" * 30, str(len(body)),
                                                                              str(max(1, len(body) - 8)), str(len(body) + 5)])
                    if rng.random() < 0.5:
                        body = body + struct.pack("<4f", 0.5, float("nan"), 2.0, -1.0)
                r = c.post("/v2/models/hp/infer", content=body, headers=headers)
                what = f"{headers.get('Inference-Header-Content-Length')!r} {body[:200]!r}"
            elif kind in (5, 6):
                files, query = _files_case(rng)
                r = c.post("/v1/models/hp:predict" + query, files=files, headers=auth)
                what = f"predict{query[:50]} {[(f, n[:30]) for f, (n, *_) in files][:3]}"
            elif kind == 7:
                path = rng.choice(PATHS)
                method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
                r = c.request(method, path, content=json.dumps(_valid(rng)).encode(), headers={**auth, "content-type": "application/json"})
                what = f"{method} {path[:80]}"
            elif kind == 8:
                headers = rng.choice(_auth_variants(token))
                path = rng.choice(["/v2/models/hp/infer", "/v2/models/hp", "/v1/models/hp:predict", "/v2/models/nope/infer"])
                r = c.post(path, content=b"{}", headers={**headers, "content-type": "application/json"}) if path != "/v2/models/hp" \
                    else c.get(path, headers=headers)
                what = f"auth {list(headers.values())[:1]!r:.80} {path}"
            else:
                req = FRAMING[(i // 10) % len(FRAMING)]
                token_header = f"Authorization: Bearer {token}\r\n".encode()
                req = req.replace(b"Host: x\r\n", b"Host: x\r\n" + token_header, 1)
                status = _raw_http(srv.port, req)
                note(status, f"framing {req[:120]!r}")
                continue
            note(r.status_code, what)
            if r.status_code >= 400 and r.request.method != "HEAD" and r.headers.get("content-type", "").startswith("application/json"):
                assert isinstance(r.json().get("error"), str), (what, r.text[:200])
            assert "traceback" not in r.text.lower()
    elapsed = time.monotonic() - start
    n = sum(statuses.values())
    assert n >= 1000
    assert not fives, fives[:10]
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0 and statuses.get(401, 0) > 0, statuses
    print(f"fuzz: {n} requests in {elapsed:.1f} s, statuses {dict(sorted(statuses.items(), key=lambda kv: str(kv[0])))}")
    # and the server still answers correctly
    model = load_bundle(d / "bundle").model
    x = torch.rand(3, 3, 32, 32)
    body = {"id": "after", "inputs": [{"name": "input", "shape": [3, 3, 32, 32], "datatype": "FP32", "data": x.flatten().tolist()}]}
    r = httpx.post(srv.url + "/v2/models/hp/infer", json=body, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "after"
    assert torch.allclose(torch.tensor(out["outputs"][0]["data"]).view(3, 10), torch.softmax(model(x), 1), atol=1e-6)
