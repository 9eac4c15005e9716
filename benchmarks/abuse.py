"""`saq-deploy serve` under abuse, on loopback with the reference engine (CPU, ONNX Runtime).

    python benchmarks/abuse.py          # adds the "Server under abuse" section to docs/results/load.md

Same artifact and engine as benchmarks/load.py (built and parity-gated if missing); the server runs
with its default limits (headers within 10 s, body within 30 s, 512 requests in flight). Phases:

1. ``--half-open`` connections that send a partial request header (or nothing) and wait; while
   they are held, a liveness probe (GET /healthz on a new connection) every 100 ms; then how long
   until the server cut each of them, and with what (408 or a bare close).
2. ``--slow-bodies`` uploads that send their headers, then one body byte per second; probes as above.
3. ``--concurrent`` simultaneous POST /v1/generate requests (one each, no retries): status counts.
4. Oversized bodies: Content-Length above the 1 MiB limit, and chunked uploads without one: 413.
Server RSS (from /proc) before and after. Raw asyncio sockets: the client holds no pools, and a
thousand sockets cost it one file descriptor each (its soft limit is raised to the hard limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import sys
import time
from pathlib import Path

import load  # benchmarks/load.py: artifact, server start, percentiles, machine line

ROOT = load.ROOT
BEGIN, END = load.ABUSE_BEGIN, load.ABUSE_END
HEADER_S, BODY_S = 10.0, 30.0  # the server's defaults (ServeConfig), stated in the report
SLACK_S = 2.0  # a cut counts as "on time" within the deadline + this (timer + scheduling on loaded cores)


async def request(port: int, raw: bytes, timeout: float) -> tuple[int, bytes]:
    """(status, body) of one request on a new connection; status 0 with the error name on failure."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as e:
        return 0, type(e).__name__.encode()
    try:
        w.write(raw)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(ln.split(":", 1)[1]) for ln in lines if ln.lower().startswith("content-length:")), 0)
        body = await asyncio.wait_for(r.readexactly(length), timeout)
        return int(lines[0].split()[1]), body
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        return 0, type(e).__name__.encode()
    finally:
        w.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()


def post(path: str, data: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def _probe_loop(port: int, every_s: float, stop, out) -> None:
    """Liveness latency (new connection, GET /healthz, read to the close) until ``stop`` is set."""
    lat, bad = [], []
    while not stop.is_set():
        t0 = time.perf_counter()
        data = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(get("/healthz"))
                while chunk := s.recv(4096):
                    data += chunk
        except OSError as e:
            data = type(e).__name__.encode()
        if data.startswith(b"HTTP/1.1 200"):
            lat.append(time.perf_counter() - t0)
        else:
            bad.append(data[:40].decode("latin-1"))
        stop.wait(every_s)
    out.put({"probes": len(lat) + len(bad), "ok": len(lat), "failures": bad, "p50_ms": load.pct(lat, 50),
             "p99_ms": load.pct(lat, 99), "max_ms": max(lat) * 1000 if lat else float("nan")})


class Prober:
    """The liveness probe in its own process, as an orchestrator's would be: the load generator's
    own event loop (a thousand sockets) must not delay or excuse the probe."""

    def __init__(self, port: int, every_s: float = 0.1) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop, self.out = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_probe_loop, args=(port, every_s, self.stop, self.out), daemon=True)
        self.proc.start()

    def finish(self) -> dict:
        self.stop.set()
        res = self.out.get(timeout=60)
        self.proc.join(30)
        return res


async def hold(port: int, first: bytes, trickle_s: float | None, give_up_s: float) -> dict:
    """Open a connection, send ``first``, then (optionally) one byte every ``trickle_s``; wait for
    the server to close it. Seconds from connect to close, and the status it sent (0: none)."""
    t0 = time.perf_counter()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return {"error": type(e).__name__}
    got = b""
    try:
        if first:
            w.write(first)
        while time.perf_counter() - t0 < give_up_s:
            try:
                chunk = await asyncio.wait_for(r.read(4096), trickle_s or give_up_s)
            except TimeoutError:
                if trickle_s:
                    w.write(b" ")
                continue
            if not chunk:
                break
            got += chunk
        else:
            return {"error": "still open"}
    except OSError:
        pass  # reset by the server: closed
    finally:
        w.close()
    status = int(got.split()[1]) if got.startswith(b"HTTP/1.1 ") else 0
    return {"closed_after_s": time.perf_counter() - t0, "status": status}


async def held_phase(port: int, pid: int, count: int, first: list[bytes], trickle_s: float | None,
                     deadline_s: float) -> dict:
    prober = Prober(port)
    await asyncio.sleep(1.0)  # the probe process is up (spawn imports torch-free, but not instantly)
    tasks = [asyncio.create_task(hold(port, first[i % len(first)], trickle_s, deadline_s + 30)) for i in range(count)]
    await asyncio.sleep(min(3.0, deadline_s / 2))
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))  # the server really holds them
    rss_held = load.rss_mb(pid)
    while not all(t.done() for t in tasks) and sum(t.done() for t in tasks) < count * 0.01:
        await asyncio.sleep(0.1)  # probes run while (almost) all are held, i.e. until the cut begins
    live = prober.finish()
    res = await asyncio.gather(*tasks)
    closed = [x["closed_after_s"] for x in res if "closed_after_s" in x]
    statuses: dict[str, int] = {}
    for x in res:
        key = str(x.get("status", x.get("error")))
        statuses[key] = statuses.get(key, 0) + 1
    return {"connections": count, "server_open_fds_while_held": open_fds, "server_rss_mb_while_held": round(rss_held, 1),
            "liveness": live, "closed": len(closed), "statuses": statuses,
            "closed_after_s": {"min": min(closed, default=float("nan")), "max": max(closed, default=float("nan"))},
            "on_time": sum(c <= deadline_s + SLACK_S for c in closed)}


async def concurrent_phase(port: int, count: int, steps: int) -> dict:
    async def one(i: int) -> int:
        return (await request(port, post("/v1/generate", json.dumps(load.body(i, steps)).encode()), 180))[0]

    prober = Prober(port, 0.2)
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    codes = await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.perf_counter() - t0
    live = prober.finish()
    statuses: dict[str, int] = {}
    for c in codes:
        statuses[str(c)] = statuses.get(str(c), 0) + 1
    return {"requests": count, "wall_s": round(wall, 2), "statuses": statuses, "liveness": live}


async def oversized_phase(port: int, count: int, size: int) -> dict:
    async def declared() -> int:  # Content-Length above the limit: refused before the body is read
        head = (f"POST /v1/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Connection: close\r\nContent-Length: {size}\r\n\r\n").encode()
        return (await request(port, head + b"{" + b" " * 65536, 30))[0]

    async def chunked() -> int:  # no Content-Length: counted while it streams
        piece = b" " * 65536
        chunks = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(size // len(piece) + 1))
        head = (b"POST /v1/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        return (await request(port, head + b"1\r\n{\r\n" + chunks + b"0\r\n\r\n", 60))[0]

    out = {}
    for name, fn in (("content_length", declared), ("chunked", chunked)):
        codes = await asyncio.gather(*(fn() for _ in range(count)))
        out[name] = {str(c): codes.count(c) for c in sorted(set(codes))}
    return out


def raise_own_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = hard if hard != resource.RLIM_INFINITY else need
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def mark(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def section(r: dict, cmd: str) -> str:
    h, s, c, o = r["half_open"], r["slow_bodies"], r["concurrent"], r["oversized"]
    growth = (r["rss_mb_after"] - r["rss_mb_before"]) / r["rss_mb_before"] * 100
    hl, sl, cl = h["liveness"], s["liveness"], c["liveness"]
    answered = sum(v for k, v in c["statuses"].items() if k in ("200", "429", "503"))
    over_ok = all(list(v) == ["413"] for v in o.values())

    def live_row(name: str, lv: dict) -> str:
        return (f"| liveness while {name}: probes ok / sent, p50 / p99 / max | {lv['ok']} / {lv['probes']}, "
                f"{lv['p50_ms']:.0f} / {lv['p99_ms']:.0f} / {lv['max_ms']:.0f} ms |")

    def cut_row(x: dict) -> str:
        return (f"| closed by the server / still open | {x['closed']} / {x['connections'] - x['closed']} "
                f"(first after {x['closed_after_s']['min']:.1f} s, last after {x['closed_after_s']['max']:.1f} s; "
                f"status sent: {', '.join(f'{k}: {v}' for k, v in sorted(x['statuses'].items()))}) |")

    return f"""{BEGIN}
## Server under abuse

Command (repository root): `{cmd}`

- Machine: {r['machine']}. Load generator and server share the cores; the load average was
  {r['loadavg']} at the start (other jobs on the machine).
- Server: `saq-deploy serve ARTIFACT` with its defaults: headers within {HEADER_S:g} s and body within
  {BODY_S:g} s (then 408 and close), at most 512 requests in flight (then 503; `/healthz` and
  `/readyz` exempt), queue 64, max body 1 MiB; open-files limit raised to the hard limit at start.
- Liveness probe: `GET /healthz` on a new connection every 100 ms (200 ms in phase 3), timeout 10 s,
  from its own process (the load generator's event loop does not delay it).

| figure | value |
|---|---|
| **1. {h['connections']} half-open connections** (half send `POST /v1/generate HTTP/1.1\\r\\nHost: …\\r\\nContent-Le` and wait, half send nothing) | |
| server file descriptors / RSS while they are held | {h['server_open_fds_while_held']} / {h['server_rss_mb_while_held']} MB |
{live_row('held', hl)}
{cut_row(h)}
| **2. {s['connections']} slow bodies** (headers with `Content-Length: 10000`, then 1 byte/s) | |
{live_row('held', sl)}
{cut_row(s)}
| **3. {c['requests']} concurrent `POST /v1/generate`** (n = 1, 10 steps, no retries) | |
| wall time | {c['wall_s']:.1f} s |
| statuses (0 = connection error) | {', '.join(f'{k}: {v}' for k, v in sorted(c['statuses'].items()))} |
{live_row('they run', cl)}
| **4. oversized bodies** ({r['oversized_count']} of each, {r['oversized_bytes'] >> 20} MiB against the 1 MiB limit) | |
| with Content-Length | {', '.join(f'{k}: {v}' for k, v in o['content_length'].items())} |
| chunked (no Content-Length) | {', '.join(f'{k}: {v}' for k, v in o['chunked'].items())} |
| server RSS before → after all phases | {r['rss_mb_before']:.1f} → {r['rss_mb_after']:.1f} MB ({growth:+.1f}%) |

| target | result |
|---|---|
| liveness answers within 1 s while {h['connections']} half-open connections are held (max probe latency, no failed probe) | {mark(hl['max_ms'] < 1000 and not hl['failures'])} (max {hl['max_ms']:.0f} ms, {len(hl['failures'])} failed) |
| half-open connections cut after the stated {HEADER_S:g} s (all closed within {HEADER_S + SLACK_S:g} s) | {mark(h['on_time'] == h['connections'])} ({h['on_time']} / {h['connections']}) |
| slow bodies cut after the stated {BODY_S:g} s (all closed within {BODY_S + SLACK_S:g} s) | {mark(s['on_time'] == s['connections'])} ({s['on_time']} / {s['connections']}) |
| liveness within 1 s while slow bodies are held | {mark(sl['max_ms'] < 1000 and not sl['failures'])} (max {sl['max_ms']:.0f} ms) |
| every one of {c['requests']} concurrent requests answered (200 / 429 / 503), no connection error | {mark(answered == c['requests'])} ({answered} / {c['requests']}) |
| liveness within 1 s during the concurrent burst | {mark(cl['max_ms'] < 1000 and not cl['failures'])} (max {cl['max_ms']:.0f} ms) |
| oversized bodies refused with 413 | {mark(over_ok)} |
| server RSS growth < 10% over the abuse phases | {mark(growth < 10)} ({growth:+.1f}%) |

Before this change (issue 15, item 5, not re-measured here): uvicorn's `limit_concurrency=512`
counted every open connection and there was no read deadline, so 520 such sockets turned
`/healthz` and `/readyz` into 503 for everyone for as long as the clients kept them open.
{END}
"""


def splice(old: str, block: str) -> str:
    """``old`` with its abuse block replaced (or appended): load.py's own sections stay."""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        return head + block.strip() + rest.split(END, 1)[1]
    return old.rstrip() + "\n\n" + block


def main() -> int:
    from saq_deploy.utils.io import write_bytes_atomic

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=ROOT / "runs" / "load" / "w8a8")
    p.add_argument("--half-open", type=int, default=1000)
    p.add_argument("--slow-bodies", type=int, default=200)
    p.add_argument("--concurrent", type=int, default=1000)
    p.add_argument("--oversized", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "load.md")
    args = p.parse_args()
    if not all(1 <= n <= 5000 for n in (args.half_open, args.slow_bodies, args.concurrent, args.oversized)):
        p.error("connection counts must be in 1..5000")
    raise_own_fd_limit(args.half_open + args.concurrent + 256)
    load.ensure_engine(args.artifact)
    port = load.free_port()
    loadavg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    proc = load.start_server(args.artifact, port, [])
    try:
        for i in range(5):  # warm-up
            asyncio.run(request(port, post("/v1/generate", json.dumps(load.body(i, args.steps)).encode()), 60))
        r: dict = {"rss_mb_before": load.rss_mb(proc.pid), "loadavg": loadavg}
        partial = [b"POST /v1/generate HTTP/1.1\r\nHost: bench\r\nContent-Le", b""]
        print(f"1. {args.half_open} half-open connections ...", flush=True)
        r["half_open"] = asyncio.run(held_phase(port, proc.pid, args.half_open, partial, None, HEADER_S))
        print(f"   {r['half_open']['liveness']} {r['half_open']['statuses']}", flush=True)
        print(f"2. {args.slow_bodies} slow bodies ...", flush=True)
        slow = [(b"POST /v1/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10000\r\n\r\n{")]
        r["slow_bodies"] = asyncio.run(held_phase(port, proc.pid, args.slow_bodies, slow, 1.0, BODY_S))
        print(f"   {r['slow_bodies']['liveness']} {r['slow_bodies']['statuses']}", flush=True)
        print(f"3. {args.concurrent} concurrent requests ...", flush=True)
        r["concurrent"] = asyncio.run(concurrent_phase(port, args.concurrent, args.steps))
        print(f"   {r['concurrent']['statuses']} in {r['concurrent']['wall_s']} s", flush=True)
        print("4. oversized bodies ...", flush=True)
        r["oversized_count"], r["oversized_bytes"] = args.oversized, 2 << 20
        r["oversized"] = asyncio.run(oversized_phase(port, args.oversized, 2 << 20))
        print(f"   {r['oversized']}", flush=True)
        time.sleep(2)
        r["rss_mb_after"] = load.rss_mb(proc.pid)
        status, _ = asyncio.run(request(port, get("/healthz"), 10))
        r["healthy_after"] = status == 200
    finally:
        proc.terminate()
        proc.wait(90)
    r["machine"] = load.machine()
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/abuse.py" + "".join(f" {a}" for a in sys.argv[1:])
    r["command"] = cmd
    old = args.out.read_text() if args.out.exists() else ""
    write_bytes_atomic(args.out, splice(old, section(r, cmd)))
    js = args.out.with_suffix(".json")
    doc = json.loads(js.read_text()) if js.exists() else {}
    doc["abuse"] = r
    write_bytes_atomic(js, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
