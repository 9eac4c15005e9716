"""Load test of `saq-deploy serve` on loopback with the reference engine (CPU, ONNX Runtime).

    python benchmarks/load.py                       # writes docs/results/load.md
    python benchmarks/load.py --clients 50 --sequential 200 --out /tmp/load.md   # quicker

1. Reference artifact (builtin:digits, W8A8 minmax: the fast recipe) and its ONNX Runtime engine,
   built if missing, then the real parity gate (`saq-deploy validate`, quality figures skipped).
2. The server as a subprocess on a free 127.0.0.1 port with its default limits.
3. Burst: ``--clients`` concurrent clients, one request each (n = 1). A 429 is the server's
   deliberate back-pressure: the client waits Retry-After and tries again (bounded attempts).
4. Steady: ``--sequential`` requests one after another on one keep-alive connection; server RSS
   (from /proc) is read before and after, and every 100 requests.
Only loopback is used; every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from saq_deploy.utils.versions import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "calibration" / "digits_w8a8_minmax.toml"
PY = sys.executable
ABUSE_BEGIN, ABUSE_END = "<!-- abuse:begin -->", "<!-- abuse:end -->"  # benchmarks/abuse.py's section


def cli(*args: str) -> list[str]:
    return [PY, "-m", "saq_deploy.cli.app", *args]


def ensure_engine(artifact: Path) -> dict:
    """Artifact + ORT engine + real parity gate; returns the gate result."""
    if not (artifact / "manifest.json").exists():
        subprocess.run(cli("calibrate", "--recipe", str(RECIPE), "-o", str(artifact)), check=True)
    engine = artifact / "engine"
    if not (engine / "manifest.json").exists():
        subprocess.run(cli("build-engine", str(artifact), "--backend", "onnxruntime"), check=True)
    gate_file = engine / "parity.json"
    manifest = json.loads((engine / "manifest.json").read_text())
    gate = json.loads(gate_file.read_text()) if gate_file.exists() else {}
    if gate.get("engine_files") != manifest["files"]:
        subprocess.run(cli("validate", str(artifact), "--backend", "onnxruntime", "--quality-n", "0",
                           "--num-samples", "8"), check=False)
        gate = json.loads(gate_file.read_text())
    return gate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(artifact: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(cli("serve", str(artifact), "--port", str(port), "--log-level", "warning", *extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            if r.status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready within 120 s")


def body(i: int, steps: int) -> dict:
    return {"label": i % 10, "n": 1, "steps": steps, "sampler": "ddim", "seed": i}


async def burst(base: str, clients: int, steps: int, max_attempts: int, deadline_s: float) -> dict:
    lat_total, lat_ok, statuses = [], [], {}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            for _ in range(max_attempts):
                t1 = time.perf_counter()
                try:
                    r = await client.post("/v1/generate", json=body(i, steps))
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                    return
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200 and r.json()["images"]:
                    lat_ok.append(time.perf_counter() - t1)
                    lat_total.append(time.perf_counter() - t0)
                    return
                if r.status_code != 429:
                    errors.append(f"HTTP {r.status_code}")
                    return
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            errors.append("gave up after repeated 429")

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(clients))), deadline_s)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "lat_total": lat_total, "lat_ok": lat_ok, "statuses": statuses, "errors": errors}


def sequential(base: str, count: int, steps: int, pid: int, deadline_s: float) -> dict:
    lat, errors, rss_trace = [], [], []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(20):  # warm-up, not measured
            client.post("/v1/generate", json=body(i, steps))
        rss0 = rss_mb(pid)
        t0 = time.perf_counter()
        for i in range(count):
            if time.perf_counter() - t0 > deadline_s:
                errors.append(f"stopped at {i}: time bound")
                break
            t1 = time.perf_counter()
            r = client.post("/v1/generate", json=body(i, steps))
            lat.append(time.perf_counter() - t1)
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}")
            if (i + 1) % 100 == 0:
                rss_trace.append(round(rss_mb(pid), 1))
        wall = time.perf_counter() - t0
        rss1 = rss_mb(pid)
    return {"wall_s": wall, "lat": lat, "errors": errors, "rss0": rss0, "rss1": rss1, "rss_trace": rss_trace}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] * 1000


def machine() -> str:
    cpu = cpu_model()
    import onnxruntime
    import torch

    return (f"{cpu}, {os.cpu_count()} logical cores (shared with other jobs), Linux {platform.release()}; "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
            f"httpx {httpx.__version__}")


NOTES = """
## Notes

- A 429 is the intended back-pressure: at most 64 requests wait, the engine takes up to 8 images
  per run, and `Retry-After` is the server's estimate of the time to drain what is queued
  (queued images / 8 x the recent time per run). "Latency incl. 429 waits" is what a client that
  honours `Retry-After` sees; "successful attempt" includes queueing behind up to 64 requests.
- The server keeps idle connections 65 s (longer than these `Retry-After` sleeps and than common
  load-balancer idle timeouts). With uvicorn's default of 5 s, a client reusing a pooled
  connection after a sleep can race the server's close; one development run had a single
  `ReadError` in the burst, most likely this race, which is why the keep-alive is set.
- One run on shared cores: wall times vary between runs with the other jobs on the machine.
"""


def report(args, gate: dict, b: dict, s: dict, server_args: list[str], cmd: str) -> str:
    n_429 = b["statuses"].get(429, 0)
    bt = b["batching"]
    growth = (s["rss1"] - s["rss0"]) / s["rss0"] * 100
    ok_burst = len(b["lat_total"])
    thr_b = ok_burst / b["wall_s"]
    thr_s = len(s["lat"]) / s["wall_s"]

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    m = gate.get("metrics", {})
    gate_line = (f"passed: {gate.get('passed')} (median cosine {m.get('median_cosine', float('nan')):.5f}, "
                 f"mean SNR {m.get('mean_snr_db', float('nan')):.1f} dB, final-sample PSNR "
                 f"{m.get('min_psnr_db', float('nan')):.1f} dB)")
    return f"""# Load test: `saq-deploy serve`, CPU, reference engine

Command (repository root): `{cmd}`

- Machine: {machine()}. The load generator runs on the same cores as the server.
- Model: `builtin:digits` W8A8 minmax artifact (`{RECIPE.relative_to(ROOT)}`), ONNX Runtime CPU engine;
  parity gate (real `saq-deploy validate`, no quality run) {gate_line}.
- Server: `{' '.join(['saq-deploy serve ARTIFACT', *server_args])}` on 127.0.0.1 (defaults otherwise: max batch 8
  images, queue 64 requests, timeout 60 s).
- Request: `{json.dumps(body(0, args.steps))}` (label and seed vary), CFG 1.5, so each image is two UNet rows.

## Burst: {args.clients} concurrent clients, one image each

Clients that get 429 wait `Retry-After` and try again (at most {args.max_attempts} attempts).

| figure | value |
|---|---|
| images returned | {ok_burst} / {args.clients} |
| wall time | {b['wall_s']:.1f} s |
| throughput | {thr_b:.1f} images/s |
| latency incl. 429 waits, p50 / p95 | {pct(b['lat_total'], 50):.0f} / {pct(b['lat_total'], 95):.0f} ms |
| latency of the successful attempt, p50 / p95 | {pct(b['lat_ok'], 50):.0f} / {pct(b['lat_ok'], 95):.0f} ms |
| HTTP statuses seen | {', '.join(f'{k}: {v}' for k, v in sorted(b['statuses'].items()))} |
| deliberate 429s (queue full, Retry-After sent) | {n_429} |
| errors other than 429 | {len(b['errors'])} {('(' + ', '.join(sorted(set(b['errors']))) + ')') if b['errors'] else ''} |
| server: engine runs / requests / busiest run | {bt['batches']} / {bt['jobs']} / {bt['largest_batch_jobs']} requests ({bt['jobs'] / max(1, bt['batches']):.1f} requests per run on average); engine busy {bt['busy_s']:.1f} s of the {b['wall_s']:.1f} s |

## Steady: {args.sequential} sequential requests (one keep-alive connection)

| figure | value |
|---|---|
| requests completed | {len(s['lat'])} |
| wall time | {s['wall_s']:.1f} s |
| throughput | {thr_s:.1f} requests/s |
| latency p50 / p95 / max | {pct(s['lat'], 50):.1f} / {pct(s['lat'], 95):.1f} / {max(s['lat']) * 1000:.1f} ms |
| mean latency | {statistics.fmean(s['lat']) * 1000:.1f} ms |
| errors | {len(s['errors'])} |
| server RSS before → after | {s['rss0']:.1f} → {s['rss1']:.1f} MB ({growth:+.2f}%) |
| RSS every 100 requests (MB) | {', '.join(map(str, s['rss_trace']))} |

## Targets

| target | result |
|---|---|
| no errors other than deliberate 429s | {mark(not b['errors'] and not s['errors'])} ({len(b['errors']) + len(s['errors'])} errors, {n_429} deliberate 429s) |
| server RSS growth < 10% over the {args.sequential} requests | {mark(growth < 10)} ({growth:+.2f}%) |
{NOTES}"""


def summary(args, b: dict, s: dict, cmd: str) -> dict:
    """The figures of the markdown, machine-readable."""
    return {
        "command": cmd, "machine": machine(), "request": body(0, args.steps),
        "burst": {"clients": args.clients, "images": len(b["lat_total"]), "wall_s": round(b["wall_s"], 2),
                  "p50_ms": pct(b["lat_total"], 50), "p95_ms": pct(b["lat_total"], 95),
                  "attempt_p50_ms": pct(b["lat_ok"], 50), "attempt_p95_ms": pct(b["lat_ok"], 95),
                  "statuses": {str(k): v for k, v in b["statuses"].items()}, "errors": b["errors"],
                  "batching": b["batching"]},
        "sequential": {"requests": len(s["lat"]), "wall_s": round(s["wall_s"], 2), "p50_ms": pct(s["lat"], 50),
                       "p95_ms": pct(s["lat"], 95), "errors": s["errors"], "rss_mb_before": round(s["rss0"], 2),
                       "rss_mb_after": round(s["rss1"], 2), "rss_trace_mb": s["rss_trace"]},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=ROOT / "runs" / "load" / "w8a8")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--sequential", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-attempts", type=int, default=30)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds per phase")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "load.md")
    args = p.parse_args()
    if not 1 <= args.clients <= 500 or not 1 <= args.sequential <= 5000:
        p.error("--clients must be in 1..500 and --sequential in 1..5000")
    gate = ensure_engine(args.artifact)
    port = free_port()
    server_args: list[str] = []
    proc = start_server(args.artifact, port, server_args)
    base = f"http://127.0.0.1:{port}"
    try:
        print(f"burst: {args.clients} clients ...", flush=True)
        b = asyncio.run(burst(base, args.clients, args.steps, args.max_attempts, args.deadline))
        b["batching"] = httpx.get(f"{base}/v1/model", timeout=10).json()["batching"]
        print(f"  {len(b['lat_total'])} images in {b['wall_s']:.1f} s, statuses {b['statuses']}", flush=True)
        print(f"steady: {args.sequential} sequential requests ...", flush=True)
        s = sequential(base, args.sequential, args.steps, proc.pid, args.deadline)
        print(f"  {len(s['lat'])} in {s['wall_s']:.1f} s, RSS {s['rss0']:.1f} -> {s['rss1']:.1f} MB", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/load.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    from saq_deploy.utils.io import write_bytes_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = report(args, gate, b, s, server_args, cmd), summary(args, b, s, cmd)
    # benchmarks/abuse.py owns a section of the same files: keep it
    old_md = args.out.read_text() if args.out.exists() else ""
    if ABUSE_BEGIN in old_md and ABUSE_END in old_md:
        md = md.rstrip() + "\n\n" + ABUSE_BEGIN + old_md.split(ABUSE_BEGIN, 1)[1].split(ABUSE_END, 1)[0] + ABUSE_END + "\n"
    old_js = args.out.with_suffix(".json")
    if old_js.exists() and "abuse" in (prev := json.loads(old_js.read_text())):
        js["abuse"] = prev["abuse"]
    write_bytes_atomic(args.out, md)
    write_bytes_atomic(args.out.with_suffix(".json"), json.dumps(js, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if not b["errors"] and not s["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
