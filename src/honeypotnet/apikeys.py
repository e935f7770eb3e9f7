"""API keys for the HTTP server: a small JSON key file that stores only sha256 hashes.

    {"format": "honeypotnet-keys/1",
     "keys": [{"name": "alice", "sha256": "<hex of sha256(token)>", "quota": 10000, "created": "..."}]}

A token is shown once, by `add_key` (``honeypotnet keys add NAME --keys FILE``); the file never
holds it, so a leaked key file does not leak working tokens. Clients send it as
``Authorization: Bearer <token>``. `quota` is a number of images (None: the server's --quota).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .ops import atomic_write_text

KEYS_FORMAT = "honeypotnet-keys/1"
TOKEN_PREFIX = "mk_"  # neutral: a key holder (perhaps a thief) learns nothing about the server
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
RESERVED_NAMES = ("anonymous",)  # what the open server logs as; a key may not take the name


class KeyFileError(ValueError):
    """The key file is missing, malformed, or an operation on it is not possible."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the token
    quota: int | None = None  # images this key may query in total (None: the server default)
    created: str = ""


def hash_token(token: str) -> str:
    """sha256 hex digest of a bearer token (what the key file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits of entropy)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def read_keys(path: str | os.PathLike) -> list[ApiKey]:
    """Parse a key file; raises KeyFileError with the reason on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"key file not found: {path} (create one with `honeypotnet keys add NAME --keys {path}`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeyFileError(f"key file {path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != KEYS_FORMAT or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f"{path} is not a honeypotnet key file (expected format {KEYS_FORMAT!r} and a 'keys' list)")
    keys, names = [], set()
    for i, k in enumerate(doc["keys"]):
        try:
            key = ApiKey(str(k["name"]), str(k["sha256"]), None if k.get("quota") is None else int(k["quota"]), str(k.get("created", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise KeyFileError(f"{path}: entry {i} is malformed ({type(e).__name__}: {e})") from e
        if not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
            raise KeyFileError(f"{path}: key {key.name!r} has no valid sha256 hash")
        if key.name in names:
            raise KeyFileError(f"{path}: key name {key.name!r} appears twice")
        names.add(key.name)
        keys.append(key)
    return keys


def write_keys(path: str | os.PathLike, keys: list[ApiKey]) -> None:
    """Write the key file atomically, readable by its owner only."""
    atomic_write_text(path, json.dumps({"format": KEYS_FORMAT, "keys": [asdict(k) for k in keys]}, indent=2) + "\n",
                      mode=0o600)


def add_key(path: str | os.PathLike, name: str, quota: int | None = None) -> str:
    """Add a key named `name` to the key file (created if absent); returns the new token.

    The token is returned once and not stored: only its sha256 goes into the file."""
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise KeyFileError(f"invalid key name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-' (not {', '.join(RESERVED_NAMES)})")
    if quota is not None and quota < 0:
        raise KeyFileError(f"quota must be >= 0 images, got {quota}")
    keys = read_keys(path) if Path(path).exists() else []
    if any(k.name == name for k in keys):
        raise KeyFileError(f"a key named {name!r} already exists in {path}; remove it first or pick another name")
    token = new_token()
    keys.append(ApiKey(name, hash_token(token), quota, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    write_keys(path, keys)
    return token


def remove_key(path: str | os.PathLike, name: str) -> None:
    """Remove the key named `name`; its token stops working at the server's next request."""
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise KeyFileError(f"no key named {name!r} in {path}")
    write_keys(path, [k for k in keys if k.name != name])


def set_quota(path: str | os.PathLike, name: str, quota: int | None) -> None:
    """Change a key's quota (images; None: the server's default). The server picks it up within a second."""
    if quota is not None and quota < 0:
        raise KeyFileError(f"quota must be >= 0 images, got {quota}")
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise KeyFileError(f"no key named {name!r} in {path}")
    write_keys(path, [ApiKey(k.name, k.sha256, quota, k.created) if k.name == name else k for k in keys])


class KeyStore:
    """The server's view of a key file, reloaded when the file changes (checked at most once a second),
    so `keys add`/`keys remove` take effect without a restart."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys = read_keys(self.path)  # fail fast at startup
        self._mtime = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            m = self._stat()
            if m is not None and m != self._mtime:
                try:
                    self._keys = read_keys(self.path)
                    self._mtime = m
                except KeyFileError:
                    pass  # a half-edited file: keep serving with the keys we had

    @property
    def keys(self) -> list[ApiKey]:
        self._refresh()
        return list(self._keys)

    def lookup(self, token: str) -> ApiKey | None:
        """The key whose hash matches `token`, compared in constant time; None if none does."""
        digest = hash_token(token)
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.sha256, digest):
                found = k
        return found
