"""Paths, logging, JSON and report writing, machine description: what every bench script uses."""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
from pathlib import Path

import torch

import honeypotnet
from honeypotnet.allocator import tune_allocator
from honeypotnet.ops import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, obj) -> None:
    """JSON (indent 2, non-JSON values through str()) written atomically."""
    atomic_write_json(path, obj)


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def set_threads() -> int:
    """torch's CPU threads: $OMP_NUM_THREADS when set, else every core (and the CPU allocator tuned for
    torch, honeypotnet.allocator). Returns the count."""
    tune_allocator()
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def command_line(module: str, argv: list[str] | None) -> str:
    """How the run was started: `python -m bench.<module> ARGS` (argv as given to main, else sys.argv)."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, map(str, args))])


def jsonable(v):
    """A config value for a JSON table (floats rounded to 6 digits, other objects as text)."""
    return v if isinstance(v, (int, str, bool)) else round(v, 6) if isinstance(v, float) else str(v)


def pct(xs: list[float]) -> str:
    """Fractions as percent: one value as it is, several as mean ± sd."""
    xs = [100 * x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def machine_info(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "honeypotnet": honeypotnet.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "allocator": tune_allocator(), "git_commit": commit}


def stage_timings(unit_timings: list[dict], first: dict[str, float] | None = None) -> dict[str, list[float]]:
    """stage -> [seconds this run, seconds including resumed units] from Units.timings, after `first`
    (stage -> seconds of work outside units, e.g. loading the data)."""
    out: dict[str, list[float]] = {k: [v, v] for k, v in (first or {}).items()}
    for u in unit_timings:
        now, total = out.setdefault(u["stage"], [0.0, 0.0])
        out[u["stage"]] = [now + (0.0 if u["resumed"] else u["seconds"]), total + u["seconds"]]
    return out


def timings_json(timings: dict[str, list[float]]) -> dict:
    return {k: {"this_run": round(a, 1), "including_resumed": round(b, 1)} for k, (a, b) in timings.items()}


def timings_table(timings: dict[str, list[float]]) -> str:
    out = ["| stage | seconds (this run) | seconds (incl. resumed units) |", "| --- | --- | --- |"]
    out += [f"| {stage} | {now:.0f} | {total:.0f} |" for stage, (now, total) in timings.items()]
    return "\n".join(out)


def load_results(paths: list[str], benchmark: str, same: tuple[str, ...]) -> list[tuple[str, dict]]:
    """The result files `paths` of `benchmark` (their JSON "benchmark" field), for merging into one report:
    (path, results) each; exits with a message when one cannot be read, is another benchmark's, or
    differs from the first in mode or in one of the `same` protocol fields. Files recorded before
    the scripts became a package name the script as bench/<name>.py: they are accepted too."""
    accepted = {benchmark, legacy_name(benchmark)}
    runs = []
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {path}: {e}")
        if not isinstance(r, dict) or r.get("benchmark") not in accepted:
            raise SystemExit(f"--merge: {path} is not a {benchmark} result")
        first_path, first = runs[0] if runs else (path, r)
        bad = (["mode"] if r.get("mode") != first.get("mode") else []) + \
            [repr(k) for k in same if r["protocol"].get(k) != first["protocol"].get(k)]
        if bad:
            raise SystemExit(f"--merge: {path} and {first_path} differ in {', '.join(bad)}")
        runs.append((path, r))
    return runs


def legacy_name(benchmark: str) -> str:
    """'bench.robustness' -> 'bench/robustness.py' (how result files named their script before)."""
    return benchmark.replace(".", "/") + ".py" if benchmark.startswith("bench.") else benchmark


def save_report(out: Path, stem: str, results: dict, markdown: str, *, record: str | None = None,
                folder: str | None = None) -> list[Path]:
    """OUT/<stem>.json and OUT/<stem>.md; with `record`, also docs/results/<folder>/<record>.{json,md}
    (the JSON with the date it was recorded) and docs/results/README.md's index rebuilt."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json(written[0], results)
    write_text(written[1], markdown.rstrip("\n") + "\n")
    if record:
        from . import index

        written += index.record(folder or stem, record, results, markdown)
    return written
