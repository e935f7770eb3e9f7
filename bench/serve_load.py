"""Load test of `honeypotnet serve`: the protected bundle vs the unprotected victim, over loopback.

    python -m bench.serve_load --run-dir runs/demo --duration 10 --clients 4 --batch 16
    python -m bench.serve_load --quick          # 2 clients x 2 s each (a smoke test)

For each of the two models the script starts its own server (a subprocess on 127.0.0.1, a free
port, its own SQLite query log), runs `--clients` concurrent client threads (httpx, keep-alive)
for `--duration` seconds, each sending v2 infer requests of `--batch` images, stops the server,
and checks that the query log holds exactly one row per answered request. The servers run one
after the other, so they never compete for the CPU. Prints a table and writes OUT/serve_load.json
(default OUT: the run directory) and OUT/serve_load.md.

--run-dir must hold `bundle/` and `victim.safetensors` (what `honeypotnet demo` writes); when it
does not, a quick demo (embedded data, QUICK sizes) is run into it first.
Everything is bounded: at most 300 s per server, 64 clients, 10^6 requests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from honeypotnet.oracles_http import encode_request

from .benchlib.args import add_common_args
from .benchlib.common import command_line, save_report


def start_server(model: Path, log: Path, name: str, max_batch: int, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """A `honeypotnet serve` subprocess on 127.0.0.1 and a free port; returns (process, base URL)."""
    cmd = [sys.executable, "-m", "honeypotnet.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
           "--name", name, "--log", str(log), "--max-batch", str(max_batch), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server for {model} exited: {proc.stderr.read()[-2000:]}")
        m = re.search(r"listening on (http://\S+?)/v2/models/", line)
        url = m.group(1) if m else None
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server for {model} did not start within {timeout} s")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipes drained
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server for {model} never became ready")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load(url: str, name: str, clients: int, duration: float, batch: int, image_size: int, max_requests: int, seed: int) -> dict:
    """`clients` threads posting for `duration` seconds; latencies of answered requests, status counts."""
    g = torch.Generator().manual_seed(seed)
    payloads = [encode_request(torch.rand(batch, 3, image_size, image_size, generator=g)) for _ in range(8)]
    infer = f"{url}/v2/models/{name}/infer"
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=60) as c:  # one request before the clock starts: first-call costs
        if c.post(infer, content=payloads[0], headers=headers).status_code != 200:
            raise RuntimeError(f"warm-up request to {infer} failed")
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    per_client = max(1, max_requests // clients)
    start = time.perf_counter()
    deadline = start + duration

    def client(i: int) -> None:
        lat, st = [], {}
        with httpx.Client(timeout=60) as c:
            for j in range(per_client):
                if time.perf_counter() >= deadline:
                    break
                t = time.perf_counter()
                try:
                    r = c.post(infer, content=payloads[(i + j) % len(payloads)], headers=headers)
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                st[r.status_code] = st.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
        with lock:
            latencies.extend(lat)
            for k, v in st.items():
                statuses[k] = statuses.get(k, 0) + v

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    answered = statuses.get(200, 0)
    return {"seconds": round(elapsed, 3), "requests": sum(statuses.values()) + len(failures), "answered": answered,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "transport_failures": failures[:5],
            "req_per_s": answered / elapsed, "images_per_s": answered * batch / elapsed,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "warmup_requests": 1}


def log_counts(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as c:
        total, ok = c.execute("SELECT COUNT(*), COUNT(CASE WHEN status = 200 THEN 1 END) FROM queries").fetchone()
    return int(total), int(ok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, quick="2 clients x 2 s per server (a smoke test)", resume=None, device=False, record=False)
    p.add_argument("--run-dir", default="runs/serve-bench", help="demo output dir with bundle/ and victim.safetensors")
    p.add_argument("--duration", type=float, help="seconds of load per server (at most 300; default 10, quick 2)")
    p.add_argument("--clients", type=int, help="concurrent clients (at most 64; default 4, quick 2)")
    p.add_argument("--batch", type=int, default=16, help="images per request")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per server")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    args.clients = args.clients if args.clients is not None else (2 if args.quick else 4)
    if not 0 < args.duration <= 300 or not 1 <= args.clients <= 64 or not 1 <= args.batch <= 256 or args.max_requests < 1:
        p.error("need 0 < --duration <= 300, 1 <= --clients <= 64, 1 <= --batch <= 256, --max-requests >= 1")
    run = Path(args.run_dir)
    if not (run / "bundle" / "manifest.json").is_file() or not (run / "victim.safetensors").is_file():
        from honeypotnet.demo import QUICK, run_demo

        print(f"{run} has no bundle/victim: running a quick demo into it first (a few minutes on CPU)", flush=True)
        run_demo(run, sizes=QUICK, progress=args.progress)
    image_size = int(json.loads((run / "bundle" / "manifest.json").read_text())["image_size"])
    results: dict = {"benchmark": "bench.serve_load", "mode": "quick" if args.quick else "full",
                     "command": command_line("bench.serve_load", argv), "config": {k: v for k, v in vars(args).items()},
                     "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "servers": {}}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        for label, model in (("protected", run / "bundle"), ("unprotected", run / "victim.safetensors")):
            db = Path(tmp) / f"{label}.db"
            proc, url = start_server(model, db, "model", max(args.batch, 256))
            try:
                r = load(url, "model", args.clients, args.duration, args.batch, image_size, args.max_requests, args.seed)
            finally:
                stop_server(proc)
            rows, ok_rows = log_counts(db)
            r["log_rows"], r["log_rows_answered"] = rows, ok_rows
            r["log_ok"] = rows == r["requests"] + r["warmup_requests"] - len(r["transport_failures"]) and \
                ok_rows == r["answered"] + r["warmup_requests"]
            results["servers"][label] = r
    prot, unprot = results["servers"]["protected"], results["servers"]["unprotected"]
    results["ratio_protected_over_unprotected"] = {
        "req_per_s": prot["req_per_s"] / unprot["req_per_s"] if unprot["req_per_s"] else None,
        "p50_ms": prot["p50_ms"] / unprot["p50_ms"] if unprot["p50_ms"] else None,
        "p99_ms": prot["p99_ms"] / unprot["p99_ms"] if unprot["p99_ms"] else None,
    }
    table = format_table(results)
    print(table)
    written = save_report(Path(args.out) if args.out else run, "serve_load", results, "```\n" + table + "\n```")
    print(f"wrote {', '.join(map(str, written))}")
    return 0 if all(s["log_ok"] for s in results["servers"].values()) else 1


def format_table(res: dict) -> str:
    c = res["config"]
    head = ("server", "answered", "errors", "req/s", "images/s", "p50 ms", "p99 ms", "log rows", "log = answered")
    rows = []
    for label, s in res["servers"].items():
        errors = s["requests"] - s["answered"]
        rows.append((label, str(s["answered"]), str(errors), f"{s['req_per_s']:.1f}", f"{s['images_per_s']:.0f}",
                     f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", str(s["log_rows"]), "yes" if s["log_ok"] else "NO"))
    r = res["ratio_protected_over_unprotected"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    rows.append(("protected/unprotected", "", "", fmt(r["req_per_s"]), fmt(r["req_per_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]), "", ""))
    w = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    line = lambda x: "  ".join(v.ljust(w[i]) if i == 0 else v.rjust(w[i]) for i, v in enumerate(x))  # noqa: E731
    title = (f"serve load: {c['clients']} clients x {c['duration']:g} s, {c['batch']} images/request, loopback "
             f"({res['cpus']} CPUs, torch threads {res['torch_threads']}); log rows include 1 warm-up request")
    return "\n".join([title, line(head), "  ".join("-" * x for x in w), *(line(x) for x in rows)])


if __name__ == "__main__":
    sys.exit(main())
