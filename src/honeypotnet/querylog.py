"""The server's query log: one SQLite row per inference request, and its summary.

Written in WAL mode with one commit per request, before the response is sent, so every answered
request has its row even if the server is killed (`kill -9`) right after answering: a committed
WAL transaction survives the death of the process (`synchronous=NORMAL` may only lose the last
transactions on a power cut or OS crash). Writes from concurrent requests are serialised by a
lock on one connection.

Schema (table ``queries``):
    id, ts (unix seconds), key (key name, "anonymous" on an open server), model, endpoint,
    images (images in the request; 0 when it could not be parsed), input_sha256 (sha256 of the
    request body), status (HTTP status), latency_ms, error (message of a rejected request)

Failed authentications (a missing, malformed or unknown token, and the 429s of an address that
made too many) are not rows of ``queries``: the server counts them per client address and writes
the counts to table ``auth_failures`` (first_ts, last_ts, address, count, throttled) at most once
a minute and when it stops, so guessing tokens cannot flood the log.

The file is created readable and writable by its owner only (0600); SQLite gives its -wal and
-shm files the same mode.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    images INTEGER NOT NULL,
    input_sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS queries_key_ts ON queries (key, ts);
CREATE TABLE IF NOT EXISTS auth_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    address TEXT NOT NULL,
    count INTEGER NOT NULL,
    throttled INTEGER NOT NULL
);
"""

BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass
class QueryRecord:
    ts: float
    key: str
    model: str
    endpoint: str
    images: int
    input_sha256: str
    status: int
    latency_ms: float
    error: str | None = None


class QueryLog:
    """Append-only SQLite query log. `path=None` keeps it in memory (quotas still work, nothing on disk)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # create it private before SQLite does (0644 by default)
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
                except OSError as e:
                    raise ValueError(f"cannot create query log {self.path}: {e}") from e
        try:
            self._conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                         isolation_level=None, timeout=30)
            if self.path is not None:
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode})")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise ValueError(f"cannot open query log {self.path}: {e}") from e
        self._lock = threading.Lock()

    def record(self, r: QueryRecord) -> None:
        """Append one row and commit it."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO queries (ts, key, model, endpoint, images, input_sha256, status, latency_ms, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.ts, r.key, r.model, r.endpoint, r.images, r.input_sha256, r.status, r.latency_ms, r.error),
            )  # autocommit mode: the INSERT is its own committed transaction

    def record_auth_failures(self, rows: list[tuple[str, float, float, int, int]]) -> None:
        """Append counted failed authentications: (address, first ts, last ts, count, throttled), one transaction."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT INTO auth_failures (address, first_ts, last_ts, count, throttled)"
                                       " VALUES (?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def images_answered(self) -> dict[str, int]:
        """Images answered (status 200) per key: what counts against quotas, also across restarts."""
        with self._lock:
            rows = self._conn.execute("SELECT key, COALESCE(SUM(images), 0) FROM queries WHERE status = 200 GROUP BY key").fetchall()
        return {k: int(n) for k, n in rows}

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM queries").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ----------------------------------------------------------------------------- summary


def _open_readonly(path: str | os.PathLike) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query log not found: {path}")
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)
        conn.execute("SELECT 1 FROM queries LIMIT 1").fetchall()
    except sqlite3.Error as e:
        raise ValueError(f"{path} is not a honeypotnet query log: {e}") from e
    return conn


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def summarise(path: str | os.PathLike, bucket: str = "hour", heavy_share: float = 0.5,
              heavy_images: int | None = None) -> dict:
    """Summary of a query log: totals, per key, per time bucket, and the heavy queriers.

    A key is flagged heavy when its share of all answered images exceeds `heavy_share`, or when
    it was answered at least `heavy_images` images. Repeated inputs (same body hash) are counted
    too: a thief replaying queries, or a client retrying."""
    if bucket not in BUCKETS:
        raise ValueError(f"unknown time bucket {bucket!r}; expected one of {', '.join(BUCKETS)}")
    if not 0 < heavy_share <= 1:
        raise ValueError(f"heavy share must be in (0, 1], got {heavy_share}")
    width = BUCKETS[bucket]
    conn = _open_readonly(path)
    try:
        total = conn.execute("SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 200 THEN images END), 0), "
                             "COUNT(CASE WHEN status = 200 THEN 1 END), MIN(ts), MAX(ts) FROM queries").fetchone()
        per_key = conn.execute(
            "SELECT key, COUNT(*), COUNT(CASE WHEN status = 200 THEN 1 END), "
            "COALESCE(SUM(CASE WHEN status = 200 THEN images END), 0), MIN(ts), MAX(ts), "
            "AVG(CASE WHEN status = 200 THEN latency_ms END), COUNT(DISTINCT CASE WHEN status = 200 THEN input_sha256 END) "
            "FROM queries GROUP BY key ORDER BY 4 DESC, 1").fetchall()
        statuses = conn.execute("SELECT key, status, COUNT(*) FROM queries GROUP BY key, status").fetchall()
        buckets = conn.execute(
            f"SELECT CAST(ts / {width} AS INTEGER) * {width} AS b, key, COUNT(*), "
            "COALESCE(SUM(CASE WHEN status = 200 THEN images END), 0) FROM queries GROUP BY b, key ORDER BY b, key").fetchall()
        try:
            auth = conn.execute("SELECT address, SUM(count), SUM(throttled) FROM auth_failures GROUP BY address "
                                "ORDER BY 2 DESC, 1").fetchall()
        except sqlite3.OperationalError:  # a log written before failed authentications were counted
            auth = []
    finally:
        conn.close()
    n_req, n_img, n_ok, first, last = total
    by_status: dict[str, dict[str, int]] = {}
    for key, status, n in statuses:
        by_status.setdefault(key, {})[str(status)] = n
    keys = []
    for key, req, ok, img, f, l, lat, distinct in per_key:
        share = img / n_img if n_img else 0.0
        reasons = []
        if n_img and share > heavy_share:
            reasons.append(f"{100 * share:.1f}% of all answered images (> {100 * heavy_share:.0f}%)")
        if heavy_images is not None and img >= heavy_images:
            reasons.append(f"{img} images (>= {heavy_images})")
        keys.append({"key": key, "requests": req, "answered": ok, "rejected": req - ok, "images": int(img),
                     "share": share, "first_seen": _iso(f), "last_seen": _iso(l),
                     "mean_latency_ms": None if lat is None else round(lat, 2),
                     "repeated_inputs": ok - distinct, "status": by_status.get(key, {}),
                     "heavy": bool(reasons), "reasons": reasons})
    rows: dict[int, dict] = {}
    for b, key, req, img in buckets:
        row = rows.setdefault(b, {"start": _iso(b), "requests": 0, "images": 0, "images_by_key": {}})
        row["requests"] += req
        row["images"] += int(img)
        row["images_by_key"][key] = int(img)
    return {"database": str(path), "requests": n_req, "answered": n_ok, "images": int(n_img),
            "first": _iso(first), "last": _iso(last), "bucket": bucket, "keys": keys,
            "buckets": list(rows.values()), "heavy": [k["key"] for k in keys if k["heavy"]],
            "heavy_share": heavy_share, "heavy_images": heavy_images,
            "auth_failures": {"total": sum(int(n) for _, n, _ in auth), "throttled": sum(int(t) for _, _, t in auth),
                              "addresses": {a: int(n) for a, n, _ in auth}}}


def format_summary(s: dict) -> str:
    """The summary as tables for a terminal."""
    lines = [f"query log {s['database']}: {s['requests']} requests, {s['answered']} answered, {s['images']} images"
             + (f", {s['first']} .. {s['last']}" if s["first"] else "")]
    fails = s.get("auth_failures") or {}
    if fails.get("total"):
        top = ", ".join(f"{a} ({n})" for a, n in list(fails["addresses"].items())[:5])
        lines.append(f"failed authentications: {fails['total']} ({fails['throttled']} throttled) from {top}")
    if not s["keys"]:
        return "\n".join(lines) + "\n(no queries yet)"
    head = ("key", "requests", "answered", "images", "share", "repeats", "first seen", "last seen", "flag")
    rows = [(k["key"], str(k["requests"]), str(k["answered"]), str(k["images"]), f"{100 * k['share']:.1f}%",
             str(k["repeated_inputs"]), k["first_seen"] or "", k["last_seen"] or "", "HEAVY" if k["heavy"] else "")
            for k in s["keys"]]
    lines += ["", *_table(head, rows)]
    keys = [k["key"] for k in s["keys"]]
    head = (f"{s['bucket']} (UTC)", "requests", "images", *keys)
    rows = [(b["start"], str(b["requests"]), str(b["images"]), *(str(b["images_by_key"].get(k, 0)) for k in keys)) for b in s["buckets"]]
    lines += ["", *_table(head, rows)]
    for k in s["keys"]:
        if k["heavy"]:
            lines.append(f"heavy querier {k['key']!r}: " + "; ".join(k["reasons"]))
    return "\n".join(lines)


def _table(head: tuple, rows: list[tuple]) -> list[str]:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return [fmt(head), "  ".join("-" * x for x in w), *(fmt(r) for r in rows)]


def summary_json(s: dict) -> str:
    return json.dumps(s, indent=2)
