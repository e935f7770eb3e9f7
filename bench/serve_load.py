"""Load test of `honeypotnet serve`: the protected bundle vs the unprotected victim, over loopback, and
the server under stress.

    python -m bench.serve_load --run-dir runs/demo --duration 10 --clients 4 --batch 16
    python -m bench.serve_load --quick          # 2 clients x 2 s each (a smoke test)

For each of the two models the script starts its own server (a subprocess on 127.0.0.1, a free
port, its own SQLite query log), runs `--clients` concurrent client threads (httpx, keep-alive)
for `--duration` seconds, each sending v2 infer requests of `--batch` images, stops the server,
and checks that the query log holds exactly one row per answered request. The servers run one
after the other, so they never compete for the CPU. Then, on the protected bundle, each with a fresh server:

* log locked: another process holds the query log's SQLite write lock (BEGIN IMMEDIATE) for
  --lock-hold seconds; health requests and 1-image infers are sent back to back meanwhile. Health
  p99, and what the infers got (503 after the server's --log-timeout, never an unlogged 200);
* uploads: two clients upload decompression-heavy PNGs (4900x4900 pixels, ~80 KB) for --duration
  seconds; health and 1-image infer p99 meanwhile;
* fuzz: a fixed set of malformed requests (bad JSON, shapes, values, files, framing, keys); the
  number answered with a 5xx;
* kill -9: clients load the server, which is killed with SIGKILL; answers the clients got (200)
  whose row is not in the log ("rows lost", which must be 0).

Prints a table and writes OUT/serve_load.json (default OUT: the run directory) and OUT/serve_load.md
(--record NAME: also docs/results/serve-load/NAME.{md,json}).

--run-dir must hold `bundle/` and `victim.safetensors` (what `honeypotnet demo` writes); when it
does not, a quick demo (embedded data, QUICK sizes) is run into it first.
Everything is bounded: at most 300 s per server, 64 clients, 10^6 requests.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
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
from .benchlib.common import command_line, machine_info, save_report
from .benchlib.index import FOLDERS

LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def start_server(model: Path, log: Path, name: str, max_batch: int, timeout: float = 180.0,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """A `honeypotnet serve` subprocess on 127.0.0.1 and a free port; returns (process, base URL)."""
    cmd = [sys.executable, "-m", "honeypotnet.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
           "--name", name, "--log", str(log), "--max-batch", str(max_batch), "--log-level", "error", *(extra or [])]
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


def one_image(image_size: int, seed: int = 0) -> bytes:
    return encode_request(torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)))


def sample(c: httpx.Client, infer: str, body: bytes, until) -> dict:
    """Until `until()`: health requests (live and ready in turn) back to back on `c`, and 1-image infers back
    to back from a second client in a thread. Latencies (ms) and the infers' statuses."""
    health, infers, statuses = [], [], {}

    def infer_client() -> None:
        with httpx.Client(base_url=str(c.base_url), timeout=60) as ci:
            while not until() or len(infers) < 20:
                t = time.perf_counter()
                r = ci.post(infer, content=body, headers={"Content-Type": "application/json"})
                infers.append(1000 * (time.perf_counter() - t))
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    thread = threading.Thread(target=infer_client)
    thread.start()
    while not until() or len(health) < 20:
        t = time.perf_counter()
        r = c.get("/v2/health/live" if len(health) % 2 else "/v2/health/ready")
        health.append(1000 * (time.perf_counter() - t))
        if r.status_code != 200:
            raise RuntimeError(f"health answered {r.status_code}")
    thread.join()
    return {"health_requests": len(health), "health_p50_ms": percentile(health, 50), "health_p99_ms": percentile(health, 99),
            "health_max_ms": max(health), "infer_requests": len(infers), "infer_p50_ms": percentile(infers, 50),
            "infer_p99_ms": percentile(infers, 99), "infer_statuses": {str(k): v for k, v in sorted(statuses.items())}}


def stress_log_locked(model: Path, tmp: Path, image_size: int, hold: float, log_timeout: float) -> dict:
    """Another process holds the log's write lock for `hold` seconds: health and 1-image infers meanwhile."""
    db = tmp / "locked.db"
    proc, url = start_server(model, db, "model", 8, extra=["--log-timeout", str(log_timeout)])
    body = one_image(image_size)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/v2/models/model/infer", content=body, headers={"Content-Type": "application/json"})  # warm-up
            holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(db), str(hold)], stdout=subprocess.PIPE, text=True)
            if holder.stdout.readline().strip() != "locked":
                raise RuntimeError("the lock holder did not get the log's write lock")
            r = sample(c, "/v2/models/model/infer", body, until=lambda: holder.poll() is not None)
            holder.wait(30)
            ok_seen = 1 + r["infer_statuses"].get("200", 0)
    finally:
        stop_server(proc)
    _, ok_rows = log_counts(db)
    return {**r, "hold_s": hold, "log_timeout_s": log_timeout, "answered_unlogged": max(0, ok_seen - ok_rows)}


def heavy_png() -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (4900, 4900), (12, 34, 56)).save(b, "PNG")
    return b.getvalue()


def stress_uploads(model: Path, tmp: Path, image_size: int, duration: float) -> dict:
    """Two clients upload decompression-heavy PNGs for `duration` seconds: health and 1-image infers meanwhile."""
    proc, url = start_server(model, tmp / "uploads.db", "model", 8)
    png, body = heavy_png(), one_image(image_size)
    uploads: list[int] = []
    try:
        deadline = time.perf_counter() + duration

        def upload() -> None:
            with httpx.Client(base_url=url, timeout=120) as u:
                while time.perf_counter() < deadline:
                    uploads.append(u.post("/v1/models/model:predict", files=[("file", ("heavy.png", png, "image/png"))]).status_code)

        threads = [threading.Thread(target=upload) for _ in range(2)]
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/v2/models/model/infer", content=body, headers={"Content-Type": "application/json"})
            for t in threads:
                t.start()
            r = sample(c, "/v2/models/model/infer", body, until=lambda: not any(t.is_alive() for t in threads))
        for t in threads:
            t.join()
    finally:
        stop_server(proc)
    return {**r, "uploads": len(uploads), "upload_statuses": {str(k): uploads.count(k) for k in sorted(set(uploads))},
            "png_bytes": len(png), "png_pixels": 4900 * 4900}


def fuzz_requests(image_size: int, seed: int, n: int) -> list[tuple[str, str, dict, bytes | list]]:
    """`n` malformed or odd requests: (method, path, headers, body bytes or multipart files)."""
    rng = random.Random(seed)
    s = image_size
    good = {"inputs": [{"name": "input", "shape": [1, 3, s, s], "datatype": "FP32", "data": [0.5] * (3 * s * s)}]}
    j = {"Content-Type": "application/json"}

    def tensor(**kw) -> bytes:
        return json.dumps({"inputs": [{**good["inputs"][0], **kw}]}).encode()

    cases = [
        lambda: ("POST", "/v2/models/model/infer", j, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
        lambda: ("POST", "/v2/models/model/infer", j, json.dumps(good).encode()[: rng.randrange(1, 200)]),
        lambda: ("POST", "/v2/models/model/infer", j, b"[" * rng.choice([10, 10_000, 100_000])),
        lambda: ("POST", "/v2/models/model/infer", j, tensor(shape=[rng.choice([-1, 0, 2**40, 7]), 3, s, s])),
        lambda: ("POST", "/v2/models/model/infer", j, tensor(datatype=rng.choice(["FP16", "INT8", "", None, 3]))),
        lambda: ("POST", "/v2/models/model/infer", j, tensor(data=[rng.choice([2.0, -1.0, "x", None, [1]])] * (3 * s * s))),
        lambda: ("POST", "/v2/models/model/infer", j, tensor(data=[0.5] * rng.randrange(0, 100))),
        lambda: ("POST", "/v2/models/model/infer", j, json.dumps(good).replace("0.5", "NaN", 1).encode()),
        lambda: ("POST", "/v2/models/model/infer", j, json.dumps({**good, "id": rng.choice([1, [], "\ud800", "x" * 999])}).encode()),
        lambda: ("POST", "/v2/models/model/infer", {"Inference-Header-Content-Length": str(rng.choice([0, 5, 10**9, -1]))}, b"{}" * 10),
        lambda: ("POST", "/v2/models/model/infer", {"Content-Type": rng.choice(["text/plain", "multipart/form-data"])}, b"{}"),
        lambda: ("POST", "/v1/models/model:predict", {}, [("file", ("x.png", bytes(rng.randrange(256) for _ in range(50)), "image/png"))]),
        lambda: ("POST", "/v1/models/model:predict", {}, [("file", ("e.png", b"", "image/png"))]),
        lambda: ("POST", "/v1/models/model:predict?top_k=" + rng.choice(["0", "-1", "x", "9" * 50]), {},
                 [("file", ("a.png", b"\x89PNG\r\n", "image/png"))]),
        lambda: (rng.choice(["GET", "PUT", "DELETE"]), rng.choice(["/v2/models/model/infer", "/v2/models/nope", "/v2//x",
                                                                   "/v2/models/model/versions/9"]), {}, b""),
        lambda: ("POST", "/v2/models/model/infer", {**j, "Authorization": rng.choice(["Bearer", "Basic x", "Bearer " + "A" * 5000])},
                 json.dumps(good).encode()),
    ]
    return [rng.choice(cases)() for _ in range(n)]


def fuzz(model: Path, tmp: Path, image_size: int, n: int, seed: int) -> dict:
    """`n` malformed requests at a fresh server: how many got a 5xx (must be 0), and the statuses."""
    proc, url = start_server(model, tmp / "fuzz.db", "model", 8)
    statuses: dict[str, int] = {}
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for method, path, headers, body in fuzz_requests(image_size, seed, n):
                if isinstance(body, list):
                    r = c.request(method, path, files=body, headers=headers)
                else:
                    r = c.request(method, path, content=body, headers=headers)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            alive = c.get("/v2/health/ready").status_code == 200
    finally:
        stop_server(proc)
    return {"requests": n, "5xx": sum(v for k, v in statuses.items() if k.startswith("5")), "statuses": dict(sorted(statuses.items())),
            "ready_after": alive}


def kill9(model: Path, tmp: Path, image_size: int, clients: int, seconds: float) -> dict:
    """Clients load the server for `seconds`, then it is killed (SIGKILL): answers the clients got whose row is missing."""
    db = tmp / "kill9.db"
    proc, url = start_server(model, db, "model", 8)
    body = one_image(image_size)
    answered = [0] * clients
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while True:
                try:
                    r = c.post("/v2/models/model/infer", content=body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError:
                    return  # the server is gone
                answered[i] += r.status_code == 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while time.perf_counter() < stop:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    for t in threads:
        t.join(60)
    _, ok_rows = log_counts(db)
    return {"clients": clients, "seconds": seconds, "answered": sum(answered), "log_rows_answered": ok_rows,
            "rows_lost": max(0, sum(answered) - ok_rows), "rows_without_delivered_answer": max(0, ok_rows - sum(answered))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, quick="2 clients x 2 s per server (a smoke test)", resume=None, device=False)
    p.add_argument("--run-dir", default="runs/serve-bench", help="demo output dir with bundle/ and victim.safetensors")
    p.add_argument("--duration", type=float, help="seconds of load per server (at most 300; default 10, quick 2)")
    p.add_argument("--clients", type=int, help="concurrent clients (at most 64; default 4, quick 2)")
    p.add_argument("--batch", type=int, default=16, help="images per request")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock-hold", type=float, default=5.0, help="seconds another process holds the log's write lock (default 5)")
    p.add_argument("--log-timeout", type=float, default=2.0, help="the stressed server's --log-timeout (default 2)")
    p.add_argument("--fuzz", type=int, default=300, help="malformed requests in the fuzz run (default 300)")
    args = p.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    args.clients = args.clients if args.clients is not None else (2 if args.quick else 4)
    if not 0 < args.duration <= 300 or not 1 <= args.clients <= 64 or not 1 <= args.batch <= 256 or args.max_requests < 1:
        p.error("need 0 < --duration <= 300, 1 <= --clients <= 64, 1 <= --batch <= 256, --max-requests >= 1")
    if not 0 < args.lock_hold <= 60 or not 0 < args.log_timeout < args.lock_hold or not 1 <= args.fuzz <= 10_000:
        p.error("need 0 < --log-timeout < --lock-hold <= 60 and 1 <= --fuzz <= 10000")
    run = Path(args.run_dir)
    if not (run / "bundle" / "manifest.json").is_file() or not (run / "victim.safetensors").is_file():
        from honeypotnet.demo import QUICK, run_demo

        print(f"{run} has no bundle/victim: running a quick demo into it first (a few minutes on CPU)", flush=True)
        run_demo(run, sizes=QUICK, progress=args.progress)
    image_size = int(json.loads((run / "bundle" / "manifest.json").read_text())["image_size"])
    results: dict = {"benchmark": "bench.serve_load", "mode": "quick" if args.quick else "full",
                     "what": "Serving throughput protected/unprotected, latency while another process holds the query log "
                             "and under decompression-heavy uploads, 5xx of a fuzz run, rows lost after kill -9",
                     "command": command_line("bench.serve_load", argv), "config": {k: v for k, v in vars(args).items()},
                     "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine_info(torch.device("cpu")),
                     "servers": {}}
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
        tmp_path = Path(tmp)
        results["log_locked"] = stress_log_locked(run / "bundle", tmp_path, image_size, args.lock_hold, args.log_timeout)
        results["uploads"] = stress_uploads(run / "bundle", tmp_path, image_size, args.duration)
        results["fuzz"] = fuzz(run / "bundle", tmp_path, image_size, args.fuzz, args.seed)
        results["kill9"] = kill9(run / "bundle", tmp_path, image_size, args.clients, args.duration)
    prot, unprot = results["servers"]["protected"], results["servers"]["unprotected"]
    results["ratio_protected_over_unprotected"] = {
        "req_per_s": prot["req_per_s"] / unprot["req_per_s"] if unprot["req_per_s"] else None,
        "p50_ms": prot["p50_ms"] / unprot["p50_ms"] if unprot["p50_ms"] else None,
        "p99_ms": prot["p99_ms"] / unprot["p99_ms"] if unprot["p99_ms"] else None,
    }
    table = format_table(results)
    print(table)
    written = save_report(Path(args.out) if args.out else run, "serve_load", results, "```\n" + table + "\n```",
                          record=args.record, folder=FOLDERS["serve_load"])
    print(f"wrote {', '.join(map(str, written))}")
    ok = all(s["log_ok"] for s in results["servers"].values()) and results["log_locked"]["answered_unlogged"] == 0 \
        and results["fuzz"]["5xx"] == 0 and results["kill9"]["rows_lost"] == 0
    return 0 if ok else 1


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
    return "\n".join([title, line(head), "  ".join("-" * x for x in w), *(line(x) for x in rows), "", format_stress(res)])


def format_stress(res: dict) -> str:
    """The stress figures (protected bundle, one fresh server each) as lines."""
    lk, up, fz, k9 = res["log_locked"], res["uploads"], res["fuzz"], res["kill9"]
    return "\n".join([
        f"log locked by another process for {lk['hold_s']:g} s (server --log-timeout {lk['log_timeout_s']:g}): "
        f"health p99 {lk['health_p99_ms']:.1f} ms (p50 {lk['health_p50_ms']:.1f}, max {lk['health_max_ms']:.1f}, "
        f"{lk['health_requests']} requests); 1-image infer statuses {lk['infer_statuses']}, p99 {lk['infer_p99_ms']:.1f} ms "
        f"(time to the 503 while locked); answers without a log row: {lk['answered_unlogged']}",
        f"two clients uploading {up['png_pixels'] / 1e6:.0f} Mpixel PNGs ({up['png_bytes'] / 1024:.0f} KB; {up['uploads']} uploads, "
        f"statuses {up['upload_statuses']}): health p99 {up['health_p99_ms']:.1f} ms (p50 {up['health_p50_ms']:.1f}), "
        f"1-image infer p99 {up['infer_p99_ms']:.1f} ms (p50 {up['infer_p50_ms']:.1f}, statuses {up['infer_statuses']})",
        f"fuzz: {fz['requests']} malformed requests, {fz['5xx']} answered 5xx, statuses {fz['statuses']}, "
        f"ready after: {'yes' if fz['ready_after'] else 'NO'}",
        f"kill -9 under load ({k9['clients']} clients, {k9['seconds']:g} s): {k9['answered']} answered, "
        f"{k9['log_rows_answered']} answered rows in the log, rows lost: {k9['rows_lost']}",
    ])


if __name__ == "__main__":
    sys.exit(main())
