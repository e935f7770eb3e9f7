"""Resumable units of work: OUT/<unit>/unit.json, keyed by the unit's parameters, written last."""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path

from .common import write_json


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
                self.timings.append({"unit": rel, "stage": stage, "seconds": rec.get("seconds", 0.0), "resumed": True})
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
        rec.update(key=key, seconds=round(time.time() - t, 2), params=params)
        write_json(done, rec)
        rec["resumed"] = False
        self.finished[rel] = rec
        self.timings.append({"unit": rel, "stage": stage, "seconds": rec["seconds"], "resumed": False})
        return dict(rec)
