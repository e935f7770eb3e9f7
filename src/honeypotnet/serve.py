"""The HTTP server: a protected bundle (or any honeypotnet model file) behind the KServe Open
Inference Protocol v2, with API keys, quotas, rate limits and a query log.

Endpoints (``{name}`` is the served model's name):

    GET  /v2/health/live, /v2/health/ready     liveness / readiness (no key needed)
    GET  /v2                                   server metadata (no key needed)
    GET  /v2/models/{name}                     model metadata: input/output names, shapes, datatypes
    GET  /v2/models/{name}/ready               model readiness
    POST /v2/models/{name}/infer               one FP32 tensor [N,3,H,W] in [0,1] -> FP32 [N,K] (JSON, or the
                                               binary tensor extension)
    .../v2/models/{name}/versions/1[/ready|/infer]  the same, for the one version the metadata advertises
    POST /v1/models/{name}:predict             image files (multipart) -> top-k labels with class names

Every error is a 4xx with a JSON body ``{"error": "..."}`` saying what was wrong; anything
unexpected is a JSON 500 without a traceback. Failed authentications are throttled per client
address and counted, not logged row by row; request heads and bodies have a read deadline. The answers are post-processed by the server's
output mode (probabilities, top-k, rounded, label). The server never says whether the model is
protected: the metadata of a bundle and of a plain model look the same.

`create_app(...)` builds the FastAPI app (tests can run it in-process); `run_server` serves it with
uvicorn; `BackgroundServer` runs it in a thread on a free port (tests, benchmarks).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _StarletteJSONResponse
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import nn

from . import __version__
from .apikeys import ApiKey, KeyFileUnavailable, KeyStore
from .ops import to_float
from .oracles import OutputMode
from .querylog import DEFAULT_TIMEOUT_S, LogUnavailable, QueryLog, QueryRecord

log = logging.getLogger("honeypotnet.serve")

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_MB = 16.0
MAX_IMAGE_PIXELS = 25_000_000  # an uploaded image larger than this (e.g. a decompression bomb) is refused
QUOTA_RETRY_AFTER_S = 3600  # a quota does not refill by itself: retry once the operator raises it
UNAVAILABLE_RETRY_AFTER_S = 2  # the query log or the key file was unavailable: worth trying again soon
INPUT_NAME = "input"
OUTPUT_NAMES = {"probs": "probabilities", "topk": "topk_probabilities", "rounded": "rounded_probabilities",
                "label": "label_onehot"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ANONYMOUS = "anonymous"
SERVER_NAME = "model-server"  # neutral on purpose: nothing the API says tells a thief the model is protected
UNAUTHENTICATED = "(unauthenticated)"
MAX_ID_CHARS = 256  # a request id longer than this is refused
MAX_AUTH_ADDRESSES = 10_000  # failed-auth buckets kept in memory; full (idle) ones are dropped beyond this
VERSIONS = ("1",)  # the model versions the metadata advertises and the versioned paths serve
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # what :predict decodes; PIL's other readers stay off
JSON_TYPES = ("application/json",)
_HEX_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse, but a string that is not valid UTF-8 (a lone surrogate) is escaped
    as \\uXXXX instead of failing after the answer was computed."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":")).encode()


class ApiError(Exception):
    """A client error: becomes a response with `status` and body {"error": message, **extra}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        message = _HEX_ADDRESS.sub("", message)  # reprs such as <_io.BytesIO object at 0x7f...>: no heap addresses out
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, **self.extra}, status_code=self.status, headers=self.headers)


class AuthError(ApiError):
    """A failed or throttled authentication: counted per client address, not logged row by row."""


class Unavailable(ApiError):
    """503: the query log cannot be written in time, or the key file is missing or unreadable. The request
    is not answered and not logged (the log may be what is failing)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}, retry_after=UNAVAILABLE_RETRY_AFTER_S)


# ----------------------------------------------------------------------------- the served model


@dataclass
class ServedModel:
    """A classifier ready to serve: float [0,1] images (N,3,S,S) -> logits (N,K)."""

    name: str
    model: nn.Module
    num_classes: int
    classes: list[str]
    image_size: int
    source: str = ""  # path it was loaded from (not exposed over HTTP)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the model's logits, (N,3,S,S) -> (N,K) float32."""
        return torch.softmax(self.model(x).float(), dim=1)


def default_model_name(path: str | os.PathLike) -> str:
    """A URL-safe model name from a bundle directory or model file path."""
    stem = Path(path).name.split(".")[0] or "model"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "model"
    return name if NAME_PATTERN.fullmatch(name) else "model"


def load_served_model(path: str | os.PathLike, name: str | None = None, image_size: int | None = None) -> ServedModel:
    """Load a bundle directory or a honeypotnet model file for serving.

    image_size: input side; a bundle fixes it (its trigger's size), a model file defaults to 32."""
    from .bundle import load_bundle, load_model

    p = Path(path)
    name = name or default_model_name(p)
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (at most 128)")
    if p.is_dir():
        b = load_bundle(p)
        size = int(b.manifest.get("image_size") or b.trigger.image_size)
        if image_size is not None and image_size != size:
            raise ValueError(f"the bundle's model takes {size}x{size} images; --image-size {image_size} does not fit it")
        model, classes, k = b.model, b.classes, int(b.manifest["num_classes"])
    else:
        model, info = load_model(p)
        k = int(info["num_classes"])
        classes = list(info.get("classes") or [])
        size = int(image_size or info.get("image_size") or 32)
    if len(classes) != k:
        classes = [str(i) for i in range(k)]
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    served = ServedModel(name, model.eval().cpu(), k, classes, size, str(p))
    out = served.probabilities(torch.zeros(1, 3, size, size))  # warm up, and check the model takes this size
    if out.shape != (1, k):
        raise ValueError(f"{p}: model answers shape {tuple(out.shape)} for one image, expected (1, {k})")
    return served


# ----------------------------------------------------------------------------- request parsing


@dataclass
class InferRequest:
    x: torch.Tensor  # float32 (N,3,S,S) in [0,1]
    id: str | None = None
    outputs: list[str] | None = None  # requested output names (None: all)
    binary_output: bool = False  # answer in the binary tensor extension


def parse_infer_request(body: bytes, image_size: int, max_batch: int, header_length: int | None = None) -> InferRequest:
    """Validate an Open Inference Protocol v2 request body; raises ApiError (400/413/422) saying what is wrong.

    header_length: the Inference-Header-Content-Length of a request in the binary tensor extension (the
    first `header_length` bytes are the JSON header; the input's raw little-endian FP32 bytes follow)."""
    binary = b""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
        body, binary = body[:header_length], body[header_length:]
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "request body must be a JSON object with an 'inputs' list (Open Inference Protocol v2)")
    rid = payload.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise ApiError(422, f"'id' must be a string, got {type(rid).__name__}")
        if len(rid) > MAX_ID_CHARS:
            raise ApiError(422, f"'id' is {len(rid)} characters; at most {MAX_ID_CHARS} are accepted")
        try:
            rid.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "'id' is not valid Unicode (it holds a lone surrogate escape)") from None
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} tensors" if isinstance(inputs, list) else type(inputs).__name__ if inputs is not None else "nothing"
        raise ApiError(422, f"'inputs' must be a list of exactly one tensor, got {got}")
    t = inputs[0]
    if not isinstance(t, dict):
        raise ApiError(422, "the input tensor must be an object with 'name', 'shape', 'datatype' and 'data'")
    if t.get("name") != INPUT_NAME:
        raise ApiError(400, f"unknown input name {t.get('name')!r}; this model has one input, named {INPUT_NAME!r}")
    want = [1, 3, image_size, image_size]
    if t.get("datatype") != "FP32":
        raise ApiError(422, f"input datatype must be 'FP32', got {t.get('datatype')!r}")
    shape = t.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ApiError(422, f"input shape must be a list [N, 3, {image_size}, {image_size}] of non-negative integers, got {shape!r}")
    if shape[1:] != want[1:]:
        raise ApiError(422, f"input shape must be [N, 3, {image_size}, {image_size}] (RGB, {image_size}x{image_size}), got {shape}")
    n = shape[0]
    if n == 0:
        raise ApiError(422, "empty batch: shape[0] is 0; send at least one image")
    if n > max_batch:
        raise ApiError(413, f"batch of {n} images exceeds the server's limit of {max_batch} per request; split it")
    params = t.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ApiError(422, f"input 'parameters' must be an object, got {type(params).__name__}")
    size = (params or {}).get("binary_data_size")
    data = t.get("data")
    if size is not None:
        want_bytes = 4 * math.prod(shape)
        if data is not None:
            raise ApiError(422, "the input has both 'data' and parameters.binary_data_size; send one of them")
        if header_length is None:
            raise ApiError(422, "parameters.binary_data_size needs the binary tensor extension (an Inference-Header-Content-Length header)")
        if not isinstance(size, int) or isinstance(size, bool) or size != want_bytes:
            raise ApiError(422, f"parameters.binary_data_size must be {want_bytes} (4 bytes per FP32 value of shape {shape}), got {size!r}")
        if len(binary) != size:
            raise ApiError(400, f"the binary section after the JSON header has {len(binary)} bytes; binary_data_size says {size}")
        arr = np.frombuffer(binary, dtype="<f4").astype(np.float64).reshape(shape)
    else:
        if binary:
            raise ApiError(400, f"{len(binary)} bytes follow the JSON header but no input has parameters.binary_data_size")
        if not isinstance(data, list):
            raise ApiError(422, f"input 'data' must be a (flat or nested) list of numbers, got {type(data).__name__}")
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError) as e:
            raise ApiError(422, f"input 'data' is not a rectangular array of numbers (ragged nesting?): {str(e)[:150]}") from None
        if arr.dtype.kind not in "iuf":
            raise ApiError(422, f"input 'data' must hold only numbers, found {'booleans' if arr.dtype.kind == 'b' else 'non-numeric values'}")
        if arr.size != math.prod(shape):
            raise ApiError(422, f"input 'data' has {arr.size} values but shape {shape} needs {math.prod(shape)}")
        if arr.ndim != 1 and list(arr.shape) != shape:
            raise ApiError(422, f"nested input 'data' has shape {list(arr.shape)} but 'shape' says {shape}")
        arr = arr.astype(np.float64, copy=False).reshape(shape)
    bad = int(arr.size - np.isfinite(arr).sum())
    if bad:
        raise ApiError(422, f"input contains {bad} NaN/inf values; send finite floats in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ApiError(422, f"input values must be in [0, 1] (RGB scaled by 1/255), got min {lo:g}, max {hi:g}")
    outputs = payload.get("outputs")
    names = None
    req_params = payload.get("parameters")
    binary_out = isinstance(req_params, dict) and req_params.get("binary_data_output") is True
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise ApiError(422, "'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in outputs]
        binary_out = binary_out or any(isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True
                                       for o in outputs)
    return InferRequest(torch.from_numpy(arr.astype(np.float32)), rid, names, binary_out)


def decode_images(files: list[tuple[str, bytes]], image_size: int) -> torch.Tensor:
    """Decode uploaded image files with PIL -> float (N,3,S,S) in [0,1] (RGB, resized bilinearly).

    Raises ApiError(422) naming the first file that is not a decodable image."""
    from PIL import Image

    out = []
    for name, data in files:
        if not data:
            raise ApiError(422, f"file {name!r} is empty")
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ApiError(422, f"file {name!r} is {im.width}x{im.height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted")
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
        except ApiError:
            raise
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise ApiError(422, f"file {name!r} is not a decodable image in one of {', '.join(IMAGE_FORMATS)} "
                                f"({type(e).__name__}: {str(e)[:150]})") from None
    return to_float(torch.stack(out))


# ----------------------------------------------------------------------------- limits


class TokenBucket:
    """Token bucket: `rate` tokens per second, at most `capacity` stored; one request or image costs one."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = float(rate), float(capacity)
        self.tokens, self.last = float(capacity), time.monotonic()

    def refill(self) -> float:
        """The tokens there now."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return self.tokens

    def wait(self, cost: float) -> float:
        """Seconds until `cost` tokens would be there (0.0: now), without taking them."""
        have = self.refill()
        return 0.0 if cost <= have else (cost - have) / self.rate

    def take(self, cost: float) -> float:
        """Take `cost` tokens; returns 0.0 if taken, else the seconds until enough would be there."""
        self.refill()
        if cost <= self.tokens:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


@dataclass
class Limits:
    """Server-side limits. quota: default images per key (a key's own quota in the key file wins);
    rate: tokens per second per key, `rate_unit` 'requests' or 'images', `burst` the bucket size."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    quota: int | None = None
    rate: float | None = None
    burst: float | None = None
    rate_unit: str = "requests"
    read_timeout_s: float = 10.0  # a request body not read whole within this many seconds gets a 408
    auth_fail_rate: float = 1.0  # failed authentications per second per client address, after ...
    auth_fail_burst: float = 20.0  # ... this many at once; beyond that the address gets 429
    auth_log_interval_s: float = 60.0  # failed authentications are written to the log as counts at most this often
    log_timeout_s: float = DEFAULT_TIMEOUT_S  # a request whose query log write cannot finish within this gets a 503

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max body size must be > 0 MB, got {self.max_body_mb}")
        if self.quota is not None and self.quota < 0:
            raise ValueError(f"quota must be >= 0 images, got {self.quota}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 per second, got {self.rate}")
        if self.rate_unit not in ("requests", "images"):
            raise ValueError(f"rate unit must be 'requests' or 'images', got {self.rate_unit!r}")
        if self.burst is not None and not self.burst >= 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"read timeout must be > 0 seconds, got {self.read_timeout_s}")
        if not self.auth_fail_rate > 0 or not self.auth_fail_burst >= 1:
            raise ValueError(f"failed-auth rate must be > 0 and burst >= 1, got {self.auth_fail_rate}, {self.auth_fail_burst}")
        if not self.auth_log_interval_s >= 0:
            raise ValueError(f"failed-auth log interval must be >= 0 seconds, got {self.auth_log_interval_s}")
        if not self.log_timeout_s > 0:
            raise ValueError(f"query log timeout must be > 0 seconds, got {self.log_timeout_s}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def bucket_size(self) -> float:
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, float(self.rate or 1)) if self.rate_unit == "requests" else max(float(self.rate or 1), float(self.max_batch))


@dataclass
class _Ctx:
    """What the query log needs to know about one request as it is handled."""

    key: str = UNAUTHENTICATED
    images: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()
    reservation: int | None = None  # the query log's reservation of this request's images against the quota


class ServerState:
    """Everything the app's handlers share: the model, the output mode, keys, limits, the log."""

    def __init__(self, served: ServedModel, output: OutputMode, keys: KeyStore | None, limits: Limits, qlog: QueryLog) -> None:
        self.served, self.output, self.keys, self.limits, self.qlog = served, output, keys, limits, qlog
        self.output_name = OUTPUT_NAMES[output.mode]
        self.buckets: dict[str, TokenBucket] = {}
        self.auth_buckets: dict[str, TokenBucket] = {}  # failed authentications per client address
        self.auth_failures: dict[str, list] = {}  # address -> [first ts, last ts, count, throttled], not yet logged
        self.auth_flushed = time.monotonic()
        self.limiter = anyio.CapacityLimiter(1)  # one forward pass at a time; torch uses the cores itself
        self.parse_limiter = anyio.CapacityLimiter(2)  # a parsed 16 MB JSON body is ~200 MB of Python floats: few at once
        self.decode_limiter = anyio.CapacityLimiter(1)  # image decoding (up to 25 Mpixels a file) on one core, apart from JSON
        self.log_limiter = anyio.CapacityLimiter(16)  # query log calls: each waits at most Limits.log_timeout_s
        self.background = ThreadPoolExecutor(1, thread_name_prefix="honeypotnet-log")  # failed-auth counts
        self.started = time.time()

    # --- checks, in the order a request meets them

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.served.name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {self.served.name!r}")
        if version is not None and version not in VERSIONS:
            raise ApiError(404, f"unknown version {version[:64]!r} of model {name!r}; it has version(s) {', '.join(VERSIONS)}")

    def authenticate(self, request: Request) -> ApiKey | None:
        """None on an open server; the caller's key otherwise, or AuthError: 401, or 429 while the client's
        address has used up its failed authentications (whatever it sends then, a valid key included)."""
        if self.keys is None:
            return None
        try:
            self.keys.check()
        except KeyFileUnavailable:
            raise Unavailable("API keys unavailable: the server's key file is missing or unreadable; "
                              "requests with a key are refused until it is restored") from None
        addr = request.client.host if request.client else "unknown"
        bucket = self.auth_buckets.get(addr)
        if bucket is not None:
            wait = bucket.wait(1)
            if wait > 0:
                self.note_auth_failure(addr, throttled=True)
                raise AuthError(429, f"too many failed authentications from this address; retry in {wait:.2f} s",
                                {"Retry-After": str(max(1, math.ceil(wait)))}, retry_after=round(wait, 3))
        challenge = {"WWW-Authenticate": 'Bearer realm="model-server"'}
        header = request.headers.get("authorization")
        scheme, _, token = (header or "").partition(" ")
        key = self.keys.lookup(token.strip()) if header and scheme.lower() == "bearer" and token.strip() else None
        if key is not None:
            return key
        if bucket is None:
            if len(self.auth_buckets) >= MAX_AUTH_ADDRESSES:  # forget addresses whose bucket has refilled ...
                for a in [a for a, b in self.auth_buckets.items() if b.refill() >= b.capacity]:
                    del self.auth_buckets[a]
                for a in list(self.auth_buckets)[: max(0, len(self.auth_buckets) - MAX_AUTH_ADDRESSES // 2)]:
                    del self.auth_buckets[a]  # ... and, if that is not enough, the oldest: memory stays bounded
            bucket = self.auth_buckets[addr] = TokenBucket(self.limits.auth_fail_rate, self.limits.auth_fail_burst)
        bucket.take(1)
        self.note_auth_failure(addr, throttled=False)
        if not header:
            raise AuthError(401, "missing API key: send the header 'Authorization: Bearer <token>'", challenge)
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <token>'", challenge)
        raise AuthError(401, "invalid API key", challenge)

    def note_auth_failure(self, addr: str, throttled: bool) -> None:
        """Count a failed (or throttled) authentication; the counts go to the log at most once per interval."""
        now = time.time()
        entry = self.auth_failures.setdefault(addr, [now, now, 0, 0])
        entry[1], entry[2], entry[3] = now, entry[2] + 1, entry[3] + throttled
        if time.monotonic() - self.auth_flushed >= self.limits.auth_log_interval_s or len(self.auth_failures) >= MAX_AUTH_ADDRESSES:
            self.flush_auth_failures(wait=False)

    def flush_auth_failures(self, wait: bool = True) -> None:
        """Write the counted failed authentications to the log (one row per address) and reset the counts;
        wait=False: in a background thread, so that the event loop never waits for the log."""
        self.auth_flushed = time.monotonic()
        pending, self.auth_failures = self.auth_failures, {}
        if pending:
            job = self.background.submit(self._write_auth_failures, [(a, f, l, n, t) for a, (f, l, n, t) in pending.items()])
            if wait:
                job.result()

    def _write_auth_failures(self, rows: list[tuple]) -> None:
        try:
            self.qlog.record_auth_failures(rows)
        except Exception:
            log.exception("query log write failed (failed-authentication counts)")

    async def in_log(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a query log call in a worker thread (the event loop never waits on SQLite); a log that cannot
        answer within Limits.log_timeout_s is a 503 (Unavailable)."""
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.log_limiter)
        except LogUnavailable as e:
            log.warning("%s", e)
            raise Unavailable(f"query log unavailable (busy for over {self.qlog.timeout_s:g} s); "
                              "the request was not answered, retry later") from None

    def check_json(self, request: Request) -> None:
        """The v2 JSON endpoints take application/json only (a browser's cross-origin 'simple' POST, text/plain
        or a form, is refused unread); a request in the binary extension carries a custom header, which no
        browser sends cross-origin without a preflight the server does not answer."""
        if request.headers.get("inference-header-content-length") is not None:
            return
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() not in JSON_TYPES:
            raise ApiError(415, f"send the request as Content-Type application/json, got {ctype[:100] or 'none'!r}")

    async def check_quota_left(self, key: ApiKey | None, key_name: str) -> None:
        """Refuse (429) a key with no image left before its request body is read."""
        quota = self.quota_of(key)
        if quota is None:
            return
        used = await self.in_log(self.qlog.images_used, key_name)
        if used >= quota:
            raise ApiError(429, f"query quota exhausted for key {key_name!r}: {used} of {quota} images used",
                           {"Retry-After": str(QUOTA_RETRY_AFTER_S)}, quota=quota, used=used)

    def rate_limit(self, key_name: str, cost: int) -> None:
        if self.limits.rate is None:
            return
        bucket = self.buckets.get(key_name)
        if bucket is None:
            bucket = self.buckets[key_name] = TokenBucket(self.limits.rate, self.limits.bucket_size)
        if cost > bucket.capacity:
            raise ApiError(413, f"a request of {cost} {self.limits.rate_unit} can never pass the rate limit "
                                f"(bucket of {bucket.capacity:g}); send smaller batches")
        wait = bucket.take(cost)
        if wait > 0:
            raise ApiError(429, f"rate limit exceeded for key {key_name!r}: {self.limits.rate:g} {self.limits.rate_unit}/s "
                                f"(burst {bucket.capacity:g}); retry in {wait:.2f} s",
                           {"Retry-After": str(max(1, math.ceil(wait)))}, retry_after=round(wait, 3))

    def quota_of(self, key: ApiKey | None) -> int | None:
        return key.quota if key is not None and key.quota is not None else self.limits.quota

    async def charge(self, key: ApiKey | None, key_name: str, n: int, ctx: _Ctx) -> None:
        """Reserve `n` images against the key's quota in the query log (one transaction, exact across the
        processes sharing the log; the reservation goes when the request's row is written), then the image rate."""
        quota = self.quota_of(key)
        if quota is not None:
            ctx.reservation, used = await self.in_log(self.qlog.reserve, key_name, n, quota)
            if ctx.reservation is None:
                raise ApiError(429, f"query quota exhausted for key {key_name!r}: {used} of {quota} images used, "
                                    f"this request asks for {n} ({max(0, quota - used)} left)",
                               {"Retry-After": str(QUOTA_RETRY_AFTER_S)}, quota=quota, used=used)
        if self.limits.rate_unit == "images":
            self.rate_limit(key_name, n)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) before it is read whole if it is over the limit."""
        limit = self.limits.max_body_bytes
        too_big = f"exceeds the limit of {limit} bytes ({self.limits.max_body_mb:g} MB)"
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.strip().isascii() and length.strip().isdigit() and len(length.strip()) <= 18):
                raise ApiError(400, f"invalid Content-Length header {length!r}")
            if int(length) > limit:
                raise ApiError(413, f"request body of {int(length)} bytes {too_big}")
        chunks, size = [], 0
        deadline = self.limits.read_timeout_s
        try:
            with anyio.fail_after(deadline):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"request body {too_big}")
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client disconnected before sending the whole body") from None
        except TimeoutError:
            raise ApiError(408, f"request body not received within the read deadline of {deadline:g} s "
                                f"({size} bytes came); the connection is closed", {"Connection": "close"}) from None
        return b"".join(chunks)

    async def answer(self, x: torch.Tensor) -> torch.Tensor:
        """Post-processed probabilities (N,K), computed in a worker thread."""
        def run() -> torch.Tensor:
            return self.output.apply(self.served.probabilities(x)).float()

        return await anyio.to_thread.run_sync(run, limiter=self.limiter)

    # --- the two inference endpoints

    async def infer(self, request: Request, model_name: str, ctx: _Ctx, version: str | None = None) -> Response:
        key = self.authenticate(request)  # before the model name: no key, nothing learnt about the server
        ctx.key = key.name if key else ANONYMOUS
        self.check_model(model_name, version)
        if self.limits.rate_unit == "requests":
            self.rate_limit(ctx.key, 1)
        self.check_json(request)
        header_length = None
        raw_hl = request.headers.get("inference-header-content-length")
        if raw_hl is not None:
            if not re.fullmatch(r"[0-9]{1,12}", raw_hl.strip()):
                raise ApiError(400, f"invalid Inference-Header-Content-Length header {raw_hl[:40]!r}")
            header_length = int(raw_hl.strip())
        await self.check_quota_left(key, ctx.key)
        body = await self.read_body(request)
        ctx.sha256 = hashlib.sha256(body).hexdigest()
        req = await anyio.to_thread.run_sync(parse_infer_request, body, self.served.image_size, self.limits.max_batch,
                                             header_length, limiter=self.parse_limiter)
        names = req.outputs
        if names is not None and any(n != self.output_name for n in names):
            raise ApiError(422, f"unknown output {[n for n in names if n != self.output_name]}; this model has one output, {self.output_name!r}")
        ctx.images = len(req.x)
        await self.charge(key, ctx.key, len(req.x), ctx)
        probs = await self.answer(req.x)
        tensor = {"name": self.output_name, "datatype": "FP32", "shape": list(probs.shape)}
        out = {"model_name": self.served.name, "model_version": VERSIONS[0], **({"id": req.id} if req.id is not None else {}),
               "outputs": [tensor]}
        if not req.binary_output:
            tensor["data"] = probs.flatten().tolist()
            return JSONResponse(out)
        raw = probs.contiguous().numpy().astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(out, separators=(",", ":")).encode()
        return Response(head + raw, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    async def predict_files(self, request: Request, model_name: str, ctx: _Ctx) -> JSONResponse:
        key = self.authenticate(request)  # before the model name: no key, nothing learnt about the server
        ctx.key = key.name if key else ANONYMOUS
        self.check_model(model_name)
        if self.limits.rate_unit == "requests":
            self.rate_limit(ctx.key, 1)
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "multipart/form-data":
            raise ApiError(415, f"send the images as multipart/form-data file fields (e.g. curl -F file=@cat.png), got Content-Type {ctype or 'none'!r}")
        raw_k = request.query_params.get("top_k", "5")
        if not re.fullmatch(r"[0-9]{1,9}", raw_k) or int(raw_k) < 1:
            raise ApiError(422, f"top_k must be a positive integer, got {raw_k[:20]!r}{'...' if len(raw_k) > 20 else ''}")
        top_k = min(int(raw_k), self.served.num_classes)
        await self.check_quota_left(key, ctx.key)
        body = await self.read_body(request)
        ctx.sha256 = hashlib.sha256(body).hexdigest()
        replay = Request(request.scope, receive=_replay(body))
        try:
            form = await replay.form(max_files=self.limits.max_batch + 1, max_fields=self.limits.max_batch + 16)
        except StarletteHTTPException as e:
            if "too many files" in str(e.detail).lower():
                raise ApiError(413, f"too many files: at most {self.limits.max_batch} images per request") from None
            raise ApiError(400, f"malformed multipart upload: {e.detail}") from None
        except Exception as e:  # the multipart parser's own errors
            raise ApiError(400, f"malformed multipart upload: {str(e)[:200]}") from None
        try:
            uploads = [(v.filename or f, v) for f, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise ApiError(422, "no image files in the upload: send one or more file fields (curl -F file=@image.png)")
            if len(uploads) > self.limits.max_batch:
                raise ApiError(413, f"too many files: {len(uploads)} > {self.limits.max_batch} images per request")
            ctx.images = len(uploads)
            await self.charge(key, ctx.key, len(uploads), ctx)  # quota and image rate before any file is decoded
            files = [(name, await v.read()) for name, v in uploads]
        finally:
            await form.close()
        x = await anyio.to_thread.run_sync(decode_images, files, self.served.image_size, limiter=self.decode_limiter)
        probs = await self.answer(x)
        scores, idx = probs.topk(top_k, dim=1)
        preds = []
        for (name, _), s, i in zip(files, scores.tolist(), idx.tolist()):
            top = [{"index": c, "class": self.served.classes[c], "score": round(p, 6)}
                   for r, (p, c) in enumerate(zip(s, i)) if r == 0 or p > 0]
            preds.append({"file": name, "top": top})
        return JSONResponse({"model_name": self.served.name, "output_mode": self.output.mode, "predictions": preds})

    async def handle(self, request: Request, endpoint: str, model_name: str,
                     fn: Callable[..., Awaitable[Response]], version: str | None = None) -> Response:
        """Run an inference endpoint; log the request (committed) before the answer leaves. A failed
        authentication is counted (flush_auth_failures), not logged as a row; a request the log cannot
        take in time (Limits.log_timeout_s) is a 503, not answered and not logged."""
        t0 = time.perf_counter()
        ctx = _Ctx()
        error = None
        try:
            response = await (fn(request, model_name, ctx, version) if version is not None else fn(request, model_name, ctx))
        except (AuthError, Unavailable) as e:
            self.qlog.release(ctx.reservation)
            return e.response()
        except ApiError as e:
            response, error = e.response(), e.message
        except Exception:
            log.exception("internal error in %s", endpoint)
            response, error = JSONResponse({"error": "internal server error"}, status_code=500), "internal server error"
        record = QueryRecord(time.time(), ctx.key, self.served.name, endpoint, ctx.images, ctx.sha256,
                             response.status_code, round(1000 * (time.perf_counter() - t0), 3), error)
        try:
            await self.in_log(self.qlog.record, record, ctx.reservation)
        except Unavailable as e:
            self.qlog.release(ctx.reservation)  # an answer we cannot log is not given
            return e.response()
        return response

    # --- metadata

    def model_metadata(self) -> dict:
        s = self.served
        return {
            "name": s.name, "versions": list(VERSIONS), "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, s.image_size, s.image_size]}],
            "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, s.num_classes]}],
            "parameters": {"classes": s.classes, "output_mode": self.output.mode,
                           **({"top_k": self.output.k} if self.output.mode == "topk" else {}),
                           **({"decimals": self.output.decimals} if self.output.mode == "rounded" else {}),
                           "input_range": [0.0, 1.0], "max_batch": self.limits.max_batch,
                           "max_body_bytes": self.limits.max_body_bytes},
        }


def _replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that hands out an already read body once."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


# ----------------------------------------------------------------------------- the app


def create_app(model_or_bundle_path: str | os.PathLike | ServedModel, *, name: str | None = None,
               output: OutputMode | None = None, keys: str | os.PathLike | None = None,
               log_path: str | os.PathLike | None = None, limits: Limits | None = None,
               image_size: int | None = None) -> FastAPI:
    """The FastAPI app serving one bundle or model file.

    keys: key file (None: an open server, every request logged as 'anonymous');
    log_path: SQLite query log (None: kept in memory); limits: batch/body sizes, quota, rate."""
    served = model_or_bundle_path if isinstance(model_or_bundle_path, ServedModel) else \
        load_served_model(model_or_bundle_path, name, image_size)
    limits = limits or Limits()
    state = ServerState(served, output or OutputMode(), KeyStore(keys) if keys is not None else None,
                        limits, QueryLog(log_path, timeout_s=limits.log_timeout_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.flush_auth_failures()
        state.background.shutdown(wait=True)
        state.qlog.close()

    app = FastAPI(title=SERVER_NAME, version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.honeypotnet = state

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": msg}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {exc.errors()}"[:500]}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}

    def metadata_or_ready(request: Request, model_name: str, version: str | None, ready: bool) -> JSONResponse:
        try:
            state.authenticate(request)
            state.check_model(model_name, version)
        except ApiError as e:
            return e.response()
        return JSONResponse({"name": model_name, "ready": True} if ready else state.model_metadata())

    @app.get("/v2/models/{model_name}")
    async def model_metadata(model_name: str, request: Request) -> JSONResponse:
        return metadata_or_ready(request, model_name, None, ready=False)

    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_version_metadata(model_name: str, version: str, request: Request) -> JSONResponse:
        return metadata_or_ready(request, model_name, version, ready=False)

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str, request: Request) -> JSONResponse:
        return metadata_or_ready(request, model_name, None, ready=True)

    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_version_ready(model_name: str, version: str, request: Request) -> JSONResponse:
        return metadata_or_ready(request, model_name, version, ready=True)

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        return await state.handle(request, "infer", model_name, state.infer)

    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer_version(model_name: str, version: str, request: Request) -> Response:
        return await state.handle(request, "infer", model_name, state.infer, version)

    @app.post("/v1/models/{model_name}:predict")
    async def predict(model_name: str, request: Request) -> JSONResponse:
        return await state.handle(request, "predict", model_name, state.predict_files)

    return app


# ----------------------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); raises RuntimeError if it cannot."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise RuntimeError(f"cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on a request's head: a connection that sends nothing, or only
    part of a request line and headers, within `seconds` (from its opening, or from the end of its previous
    answer) is closed. uvicorn alone times out only idle keep-alive connections after a first answer, so a
    client could hold connections open forever by sending its headers slowly. Once the head is in, the
    app's read deadline (Limits.read_timeout_s) covers the body."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _head_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # still waiting for a request's head

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                try:  # the head and the body of an answer are two writes: without this, Nagle's algorithm and the
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # client's delayed ACK add ~40 ms
                except OSError:
                    pass
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a head came in: the body's deadline is the app's

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def _read_timeout(app: FastAPI) -> float:
    state = getattr(app.state, "honeypotnet", None)
    return state.limits.read_timeout_s if state is not None else Limits().read_timeout_s


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               on_listening: Callable[[str, int], None] | None = None) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM. `on_listening(host, port)` is called once the
    socket is bound (with the real port when `port` is 0)."""
    import uvicorn

    sock = bind_socket(host, port)
    if on_listening is not None:
        on_listening(host, sock.getsockname()[1])
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, server_header=False,
                            http=header_deadline_protocol(_read_timeout(app)))
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread on 127.0.0.1 and a free port.

        with BackgroundServer(create_app(path)) as srv:
            httpx.get(srv.url + "/v2/health/ready")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.app, self.host = app, host
        self.sock = bind_socket(host, port)
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                                                       server_header=False, http=header_deadline_protocol(_read_timeout(app))))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="honeypotnet-server")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
