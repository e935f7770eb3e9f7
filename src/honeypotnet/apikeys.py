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
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .ops import atomic_write_text

log = logging.getLogger("honeypotnet.serve")

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


class KeyFileUnavailable(KeyFileError):
    """The server's key file is gone or cannot be parsed: every request with a key is refused until it is back."""


class KeyStore:
    """The server's view of a key file, re-checked at most every CHECK_INTERVAL_S seconds (a stat of its
    inode, mtime and size; re-read when they change), so `keys add`/`keys remove` take effect without a
    restart. It fails closed: while the file is missing or cannot be parsed, `check` and `lookup` raise
    KeyFileUnavailable, and no key works until a valid file is back."""

    CHECK_INTERVAL_S = 0.5

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys = read_keys(self.path)  # fail fast at startup
        self._signature = self._stat()
        self._error: str | None = None
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.CHECK_INTERVAL_S:
            return
        with self._lock:
            self._checked = now
            signature = self._stat()
            if signature is None:
                self._set_error(f"key file {self.path} is missing")
            elif signature != self._signature or self._error is not None:
                self._signature = signature
                try:
                    self._keys = read_keys(self.path)
                    if self._error is not None:
                        log.warning("key file %s is readable again: keys accepted", self.path)
                    self._error = None
                except KeyFileError as e:
                    self._set_error(str(e))

    def _set_error(self, message: str) -> None:
        if self._error != message:
            log.error("%s: every request with a key is refused until the file is fixed", message)
        self._error = message

    def check(self) -> None:
        """Raise KeyFileUnavailable while the key file is missing or unreadable."""
        self._refresh()
        if self._error is not None:
            raise KeyFileUnavailable(self._error)

    @property
    def keys(self) -> list[ApiKey]:
        self.check()
        return list(self._keys)

    def lookup(self, token: str) -> ApiKey | None:
        """The key whose hash matches `token`, compared in constant time; None if none does.
        Raises KeyFileUnavailable while the key file is missing or unreadable."""
        digest = hash_token(token)
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.sha256, digest):
                found = k
        return found
