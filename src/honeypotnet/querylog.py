"""The server's query log: one SQLite row per inference request, and its summary.

Written in WAL mode with one commit per request, before the response is sent, so every answered
request has its row even if the server is killed (`kill -9`) right after answering: a committed
WAL transaction survives the death of the process (`synchronous=NORMAL` may only lose the last
transactions on a power cut or OS crash). Writes from concurrent requests are serialised by a
lock on one connection; every call waits at most `timeout_s` (for that lock and for SQLite's
write lock, which another process may hold) and raises `LogUnavailable` after that, so a caller
can refuse to answer instead of answering unlogged.

Quotas are kept in the log, so that several server processes sharing one log file share them
exactly: table ``usage`` (key, images) counts the images answered per key (updated in the same
transaction as each answered row), and table ``reservations`` (id, ts, key, images, pid) holds the
images of requests being answered. `reserve` checks a key's quota and reserves its images in one
``BEGIN IMMEDIATE`` transaction; `record` writes the request's row and drops its reservation in
another. Reservations of a process that is gone (`kill -9`) are dropped by the next `reserve`.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    key TEXT NOT NULL,
    images INTEGER NOT NULL,
    pid INTEGER NOT NULL
);
"""
USAGE_SCHEMA = "CREATE TABLE usage (key TEXT PRIMARY KEY, images INTEGER NOT NULL)"
OPEN_WAIT_S = 30.0  # how long opening the log waits for other processes opening or writing it
DEFAULT_TIMEOUT_S = 2.0  # how long a log call waits for its turn and for SQLite's write lock
RESERVATION_TTL_S = 3600.0  # a reservation older than this (its request long gone) no longer counts

BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}


class LogUnavailable(RuntimeError):
    """The query log could not be read or written within its timeout (locked by another process, or failing)."""


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (the log's processes share the host: SQLite's WAL needs it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """Append-only SQLite query log. `path=None` keeps it in memory (quotas still work, nothing on disk).

    timeout_s: the longest any call waits (for the other threads of this process, and for SQLite's
    write lock, which another process may hold) before it raises LogUnavailable."""

    def __init__(self, path: str | os.PathLike | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"query log timeout must be > 0 seconds, got {timeout_s}")
        self.path = Path(path) if path is not None else None
        self.timeout_s = float(timeout_s)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # create it private before SQLite does (0644 by default)
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
                except OSError as e:
                    raise ValueError(f"cannot create query log {self.path}: {e}") from e
        try:
            self._conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                         isolation_level=None, timeout=OPEN_WAIT_S)
            if self.path is not None:
                mode = _switch_to_wal(self._conn, OPEN_WAIT_S)
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode})")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            self._create_usage()
        except sqlite3.Error as e:
            raise ValueError(f"cannot open query log {self.path}: {e}") from e
        self._lock = threading.Lock()
        self._unreleased: list[int] = []  # reservations to drop with the next write (their request was not logged)
        self._unreleased_lock = threading.Lock()
        self._pid = os.getpid()

    def _create_usage(self) -> None:
        """Table usage, filled from the rows of a log written before it existed (once, whoever opens it first)."""
        with _transaction(self._conn):
            if self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'").fetchone():
                return
            self._conn.execute(USAGE_SCHEMA)
            self._conn.execute("INSERT INTO usage (key, images) SELECT key, SUM(images) FROM queries "
                               "WHERE status = 200 GROUP BY key")

    @contextmanager
    def _turn(self) -> Iterator[sqlite3.Connection]:
        """The connection, for this thread alone, with every wait bounded by timeout_s; raises LogUnavailable."""
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            raise LogUnavailable(f"query log busy: no turn within {self.timeout_s:g} s")
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LogUnavailable(f"query log busy: no turn within {self.timeout_s:g} s")
            self._conn.execute(f"PRAGMA busy_timeout = {max(1, int(1000 * left))}")
            yield self._conn
        except sqlite3.Error as e:
            raise LogUnavailable(f"query log unavailable ({type(e).__name__}: {e})") from e
        finally:
            self._lock.release()

    def record(self, r: QueryRecord, reservation: int | None = None) -> None:
        """Append one row and commit it; an answered row (status 200) counts its images against the key's
        quota, and the request's reservation (if any) is dropped in the same transaction."""
        with self._turn() as conn, _transaction(conn):
            conn.execute(
                "INSERT INTO queries (ts, key, model, endpoint, images, input_sha256, status, latency_ms, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.ts, r.key, r.model, r.endpoint, r.images, r.input_sha256, r.status, r.latency_ms, r.error),
            )
            if r.status == 200 and r.images:
                conn.execute("INSERT INTO usage (key, images) VALUES (?, ?) "
                             "ON CONFLICT (key) DO UPDATE SET images = images + excluded.images", (r.key, r.images))
            self._drop(conn, [reservation] if reservation is not None else [])

    def reserve(self, key: str, images: int, quota: int) -> tuple[int | None, int]:
        """Check `key`'s quota and reserve `images` against it, in one transaction shared with every process
        using this log. Returns (reservation id, images used before) or (None, images used) when they do not fit."""
        with self._turn() as conn, _transaction(conn):
            now = time.time()
            conn.execute("DELETE FROM reservations WHERE ts < ?", (now - RESERVATION_TTL_S,))
            for (pid,) in conn.execute("SELECT DISTINCT pid FROM reservations WHERE pid != ?", (self._pid,)).fetchall():
                if not _alive(pid):
                    conn.execute("DELETE FROM reservations WHERE pid = ?", (pid,))
            self._drop(conn, [])
            used = self._used(conn, key)
            if used + images > quota:
                return None, used
            cur = conn.execute("INSERT INTO reservations (ts, key, images, pid) VALUES (?, ?, ?, ?)",
                               (now, key, images, self._pid))
            return int(cur.lastrowid), used

    def release(self, reservation: int | None) -> None:
        """Drop a reservation whose request was not logged; done with this process's next write."""
        if reservation is not None:
            with self._unreleased_lock:
                self._unreleased.append(reservation)

    def images_used(self, key: str) -> int:
        """Images answered to `key`, plus those reserved for its requests being answered."""
        with self._turn() as conn:
            return self._used(conn, key)

    @staticmethod
    def _used(conn: sqlite3.Connection, key: str) -> int:
        answered = conn.execute("SELECT images FROM usage WHERE key = ?", (key,)).fetchone()
        reserved = conn.execute("SELECT COALESCE(SUM(images), 0) FROM reservations WHERE key = ?", (key,)).fetchone()
        return int(answered[0] if answered else 0) + int(reserved[0])

    def _drop(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        """Delete reservations `ids` and the ones left to drop (inside the caller's transaction)."""
        with self._unreleased_lock:
            ids, self._unreleased = ids + self._unreleased, []
        try:
            conn.executemany("DELETE FROM reservations WHERE id = ?", [(i,) for i in ids])
        except BaseException:
            with self._unreleased_lock:
                self._unreleased += ids
            raise

    def record_auth_failures(self, rows: list[tuple[str, float, float, int, int]]) -> None:
        """Append counted failed authentications: (address, first ts, last ts, count, throttled), one transaction."""
        with self._turn() as conn, _transaction(conn):
            conn.executemany("INSERT INTO auth_failures (address, first_ts, last_ts, count, throttled)"
                             " VALUES (?, ?, ?, ?, ?)", rows)

    def images_answered(self) -> dict[str, int]:
        """Images answered (status 200) per key: what counts against quotas, also across restarts."""
        with self._turn() as conn:
            rows = conn.execute("SELECT key, images FROM usage").fetchall()
        return {k: int(n) for k, n in rows}

    def count(self) -> int:
        with self._turn() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM queries").fetchone()[0])

    def close(self) -> None:
        """Drop the reservations still to drop (best effort), then close the connection."""
        try:
            if self._unreleased:
                with self._turn() as conn, _transaction(conn):
                    self._drop(conn, [])
        except LogUnavailable:
            pass  # left to the next server's reserve (this process will be gone)
        with self._lock:
            self._conn.close()


def _switch_to_wal(conn: sqlite3.Connection, wait_s: float) -> str:
    """PRAGMA journal_mode=WAL, retried while another process holds the lock it needs, for up to wait_s.

    SQLite answers "database is locked" to this pragma at once, without its busy wait, when another
    connection is opening the same new file at the same moment (several server processes started
    together); the schema statements after it do wait. Returns the journal mode SQLite reports."""
    deadline = time.monotonic() + wait_s
    pause = 0.002
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(0.1, 2 * pause)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (SQLite's write lock, waited for up to the connection's busy timeout) ... COMMIT,
    or ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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
