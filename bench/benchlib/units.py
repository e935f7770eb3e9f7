"""Resumable units of work: OUT/<unit>/unit.json, keyed by the unit's parameters, written last."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from .common import REPO, write_json

UNRECORDED = "unrecorded"  # a unit made before units recorded their code


@functools.lru_cache(maxsize=1)
def code_revision() -> str | None:
    """The code a unit is computed with: the checkout's commit (12 hex digits), with "+dirty" when src/ or
    bench/ differ from it; None outside a git checkout. A unit's key is its parameters, not its code (so a
    code change does not recompute finished work): this records which code made it, for the report."""
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "bench")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def code_summary(unit_timings: list[dict]) -> str:
    """One line for a report: how many of its units each code revision computed."""
    counts = Counter(u.get("code") or UNRECORDED for u in unit_timings)
    parts = [f"{code} ({n} unit{'s' if n != 1 else ''})" for code, n in sorted(counts.items())]
    return ("Units by the code that computed them (git commit; +dirty = uncommitted changes in src/ or bench/; "
            f"{UNRECORDED} = made before units recorded it): " + (", ".join(parts) or "none") + ".")


def key_of(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DeadlineReached(Exception):
    """A unit would start after Units.deadline (its rel is the message): the run stops there."""


class Units:
    """Each unit: OUT/<rel>/unit.json written last (atomically), keyed by its parameters.
    deadline: a time.time() after which no unit starts (finished ones are still resumed): run()
    raises DeadlineReached instead, so a run lent a machine for minutes can write what it has."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out, self.resume = Path(out), resume
        self.deadline: float | None = None
        self.timings: list[dict] = []
        self.finished: dict[str, dict] = {}  # rel -> record, for units this process ran or resumed

    def run(self, rel: str, params: dict, fn, stage: str) -> dict:
        """Run (or resume) one unit: fn(unit directory) -> record. Two processes sharing OUT (e.g. two
        bench scripts at once) take turns on the same unit: the second waits for the first's lock and
        then reuses its result."""
        d = self.out / rel
        key = key_of(params)
        if rel in self.finished and self.finished[rel]["key"] == key:  # already run (or resumed) by this process
            return dict(self.finished[rel])
        d.parent.mkdir(parents=True, exist_ok=True)
        with open(d.parent / f".{d.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._run_locked(rel, d, key, params, fn, stage)

    def _run_locked(self, rel: str, d: Path, key: str, params: dict, fn, stage: str) -> dict:
        done = d / "unit.json"
        if self.resume and done.exists():
            rec = json.loads(done.read_text())
            if rec.get("key") == key:
                rec["resumed"] = True
                self.finished[rel] = rec
                self.timings.append({"unit": rel, "stage": stage, "seconds": rec.get("seconds", 0.0), "resumed": True,
                                     "code": rec.get("code")})
                return dict(rec)
        if self.deadline is not None and time.time() > self.deadline:  # before anything on disk is removed
            raise DeadlineReached(rel)
        if d.exists() and not (self.resume and (d / "unit.key").exists() and (d / "unit.key").read_text() == key
                               and not done.exists()):
            shutil.rmtree(d)  # recompute from scratch (a partial state of the same key is kept with --resume)
        d.mkdir(parents=True, exist_ok=True)
        (d / "unit.key").write_text(key)
        t = time.time()
        rec = fn(d)
        rec.update(key=key, seconds=round(time.time() - t, 2), params=params, code=code_revision())
        write_json(done, rec)
        rec["resumed"] = False
        self.finished[rel] = rec
        self.timings.append({"unit": rel, "stage": stage, "seconds": rec["seconds"], "resumed": False,
                             "code": rec["code"]})
        return dict(rec)
