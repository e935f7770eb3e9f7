"""An oracle behind HTTP: the Open Inference Protocol v2 endpoint of `honeypotnet serve` (or any
v2 server that takes one FP32 [N,3,H,W] tensor in [0,1] and answers one FP32 [N,K] tensor).

    oracle = HttpOracle("http://127.0.0.1:8000/v2/models/bundle", api_key="hpn_...")
    probs = oracle(images)      # float (N,3,H,W) in [0,1] -> (N,K), batched, retried, counted

Batches are split to fit the server's max batch and body size (and halved on a 413); a 429 is
retried after its Retry-After (the body's precise `retry_after` when given), up to `max_wait`
seconds a wait and `max_retries` times; connection errors and 502/503/504 are retried with
backoff. Anything else raises `HttpOracleError` with the server's own error message.
"""
from __future__ import annotations

import math
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch

from .oracles import Oracle, OutputMode

RETRYABLE = (502, 503, 504)


class HttpOracleError(RuntimeError):
    """The endpoint could not be reached, refused the request, or answered something unusable."""


def is_url(s: str | object) -> bool:
    """True for an http(s) URL (what the CLI takes instead of a local model path)."""
    return isinstance(s, str) and s.lower().startswith(("http://", "https://"))


def model_url(url: str) -> str:
    """Normalise a v2 URL to ``.../v2/models/NAME`` or ``.../v2/models/NAME/versions/V`` (accepts a trailing
    '/infer' or '/')."""
    if not is_url(url):
        raise HttpOracleError(f"not an http(s) URL: {url!r}")
    u = url.rstrip("/")
    if u.endswith("/infer"):
        u = u[: -len("/infer")]
    parts = urlsplit(u)
    segs = parts.path.strip("/").split("/")
    if len(segs) >= 5 and segs[-5:-3] == ["v2", "models"] and segs[-2] == "versions" and segs[-3] and segs[-1]:
        return u
    if len(segs) < 3 or segs[-3:-1] != ["v2", "models"] or not segs[-1]:
        raise HttpOracleError(f"{url!r} is not a v2 model URL; expected http://HOST:PORT/v2/models/NAME")
    return u


def encode_request(x: torch.Tensor, input_name: str = "input") -> bytes:
    """A v2 infer request body for float (N,3,H,W); '%.9g' round-trips every float32 exactly."""
    flat = x.detach().to(torch.float32).cpu().contiguous().numpy().ravel()
    data = ",".join(map("{:.9g}".format, flat.tolist()))
    head = '{"inputs":[{"name":"%s","shape":[%s],"datatype":"FP32","data":[' % (input_name, ",".join(map(str, x.shape)))
    return (head + data + "]}]}").encode()


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    return r.text[:300] or r.reason_phrase


def _retry_after(r: httpx.Response) -> float:
    """Seconds to wait from a 429: the body's `retry_after` (precise) or the Retry-After header."""
    try:
        body = r.json()
        if isinstance(body, dict) and isinstance(body.get("retry_after"), (int, float)):
            return max(0.0, float(body["retry_after"]))
    except ValueError:
        pass
    header = r.headers.get("retry-after", "1")
    try:
        return max(0.0, float(header))
    except ValueError:
        return 1.0  # an HTTP date: rare, wait a little and try again


class HttpOracle(Oracle):
    """`Oracle` over a v2 inference endpoint.

    url: ``http://HOST:PORT/v2/models/NAME``; api_key: bearer token (None for an open server);
    output: client-side post-processing on top of what the server answers (default: none);
    batch_size: images per request at most (also capped by the server's advertised limits);
    timeout: seconds per request; max_retries / max_wait: how long to keep trying on 429/5xx."""

    def __init__(self, url: str, api_key: str | None = None, output: OutputMode | None = None,
                 budget: int | None = None, batch_size: int = 256, timeout: float = 60.0,
                 max_retries: int = 10, max_wait: float = 60.0, client: httpx.Client | None = None) -> None:
        super().__init__(output, budget)
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.url = model_url(url)
        self.infer_url = self.url + "/infer"
        self.max_retries, self.max_wait = max_retries, max_wait
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_client = client is None
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        if client is not None and api_key:
            self.client.headers["Authorization"] = f"Bearer {api_key}"
        self.requests = 0  # HTTP requests sent (retries included)
        self.metadata = self._get_metadata()
        try:
            inp, out = self.metadata["inputs"][0], self.metadata["outputs"][0]
            self.input_name = str(inp["name"])
            self.image_size = int(inp["shape"][-1])
            self.num_classes = int(out["shape"][-1])
            params = self.metadata.get("parameters") or {}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise HttpOracleError(f"{self.url} answered model metadata without usable input/output shapes: {e}") from e
        classes = params.get("classes") if isinstance(params, dict) else None
        self.classes = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == self.num_classes else \
            [str(i) for i in range(self.num_classes)]
        per_image = 3 * self.image_size * self.image_size * 13 + 8  # bytes of '%.9g,' per value, at most
        limit = batch_size
        if isinstance(params, dict) and isinstance(params.get("max_batch"), int):
            limit = min(limit, params["max_batch"])
        if isinstance(params, dict) and isinstance(params.get("max_body_bytes"), int):
            limit = min(limit, max(1, (params["max_body_bytes"] - 256) // per_image))
        self.batch_size = max(1, limit)

    # --- HTTP with retries

    def _send(self, method: str, url: str, **kw) -> httpx.Response:
        """One logical request: retried on connection errors, 429 and 502/503/504; never raises httpx errors."""
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                r = self.client.request(method, url, **kw)
            except httpx.TimeoutException as e:
                if attempt > self.max_retries:
                    raise HttpOracleError(f"{method} {url} timed out {attempt} times ({type(e).__name__})") from e
                time.sleep(min(self.max_wait, 0.5 * 2 ** (attempt - 1)))
                continue
            except httpx.TransportError as e:
                if attempt > self.max_retries:
                    raise HttpOracleError(f"cannot reach {url}: {type(e).__name__}: {e}") from e
                time.sleep(min(self.max_wait, 0.2 * 2 ** (attempt - 1)))
                continue
            if r.status_code == 429 or r.status_code in RETRYABLE:
                wait = _retry_after(r) if r.status_code == 429 else min(self.max_wait, 0.5 * 2 ** (attempt - 1))
                if wait > self.max_wait or attempt > self.max_retries:
                    why = f"Retry-After {wait:g} s is over max_wait {self.max_wait:g} s" if wait > self.max_wait else f"gave up after {attempt} tries"
                    raise HttpOracleError(f"{url} answered {r.status_code}: {_error_message(r)} ({why})")
                time.sleep(wait)
                continue
            return r

    def _get_metadata(self) -> dict:
        r = self._send("GET", self.url)
        if r.status_code != 200:
            raise HttpOracleError(f"model metadata {self.url} answered {r.status_code}: {_error_message(r)}")
        try:
            meta = r.json()
        except ValueError as e:
            raise HttpOracleError(f"model metadata {self.url} is not JSON") from e
        if not isinstance(meta, dict):
            raise HttpOracleError(f"model metadata {self.url} is not a JSON object")
        return meta

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        r = self._send("POST", self.infer_url, content=encode_request(x, self.input_name),
                       headers={"Content-Type": "application/json"})
        if r.status_code == 413 and len(x) > 1:  # the server's limits are lower than advertised: halve
            half = math.ceil(len(x) / 2)
            self.batch_size = max(1, min(self.batch_size, half))
            return torch.cat([self._infer(x[:half]), self._infer(x[half:])])
        if r.status_code != 200:
            raise HttpOracleError(f"{self.infer_url} answered {r.status_code}: {_error_message(r)}")
        try:
            out = r.json()["outputs"][0]
            probs = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise HttpOracleError(f"{self.infer_url} answered an unusable body ({type(e).__name__}: {e})") from e
        if probs.shape != (len(x), self.num_classes):
            raise HttpOracleError(f"{self.infer_url} answered shape {list(probs.shape)} for {len(x)} images, expected [{len(x)}, {self.num_classes}]")
        return torch.from_numpy(probs)

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the endpoint takes {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        return torch.cat([self._infer(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> "HttpOracle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
