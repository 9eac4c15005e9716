"""Fault injection: kill -9 the CLI at random moments, re-run the same command, compare with an
uninterrupted run (issue 15).

    python benchmarks/faults.py                      # 20 kills, writes docs/results/faults.{md,json}
    python benchmarks/faults.py --kills 8 --out /tmp/faults.md   # quicker

Four commands on builtin:digits with small but real settings (one run takes tens of seconds):
``calibrate`` SA-PTQ W8A8 (data collection, quantize + activation init, block reconstruction),
``calibrate`` SA-QLoRA W4A8 (data collection, LoRA setup, 3 epochs; the recipe's mixstep and batch
are shortened in a copy, as the CLI cannot override them), ``export`` (both ONNX targets)
and ``build-engine`` (ONNX Runtime). For each: one uninterrupted reference run (file hashes), one
uninterrupted control run (which files differ between two clean runs: those carrying wall times),
then the kills. A kill: start the command in its own process group, sleep a random moment inside
the reference duration (jittered strata, so every phase gets hit), SIGKILL the group, note the
phase from the files present, re-run the same command to completion and compare every file with
the reference; anything not in the reference tree is a leftover. Time lost = kill moment + re-run
time - reference time. Every process runs with OMP_NUM_THREADS=1: float reductions depend on the
thread count, so byte-identity is only defined at a fixed count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saq_deploy.utils.versions import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = ["-n", "2", "--steps", "3"]
# Fields that hold wall-clock durations (and the seal that hashes them): they differ between two
# uninterrupted runs, so they are masked before comparing; every other byte must match.
TIME_KEYS = {"wall_time_s", "finetune_s", "seconds", "train_s", "build_time_s", "manifest_sha256"}
TIME_RE = re.compile(r"\d+(?:\.\d+)? s\b")


def cli(*args: str) -> list[str]:
    return [PY, "-m", "saq_deploy.cli.app", *args]


def qlora_recipe(work: Path) -> Path:
    """The W4A8 SA-QLoRA recipe with a shorter mixstep and batch (the CLI cannot override them)."""
    text = (ROOT / "calibration" / "digits_w4a8_sa-qlora.toml").read_text()
    text = re.sub(r"(?m)^mixstep = .*$", "mixstep = [3]", text)
    text = re.sub(r"(?m)^batch_size = \d+.*$", "batch_size = 2", text)
    path = work / "recipes" / "digits_w4a8_sa-qlora_faults.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def commands(work: Path, run: Path) -> dict[str, dict]:
    art = run / "art"
    return {
        "calibrate sa-ptq": {"argv": cli("calibrate", "-c", str(ROOT / "calibration/digits_w8a8_sa-ptq.toml"),
                                         "-o", str(run / "cal"), *SMALL, "--iters", "5"), "input": None},
        "calibrate sa-qlora": {"argv": cli("calibrate", "-c", str(qlora_recipe(work)), "-o", str(run / "cal"),
                                           *SMALL, "--epochs", "3"), "input": None},
        "export": {"argv": cli("export", str(art), "--calib-samples", "2"), "input": "calibrated"},
        "build-engine": {"argv": cli("build-engine", str(art), "--backend", "onnxruntime"), "input": "exported"},
    }


def shown(argv: list[str], run: Path) -> str:
    """The command as a reader would type it: repository-relative, scratch folder as $RUN."""
    text = " ".join(["python", *argv[1:]])
    return text.replace(str(run), "$RUN").replace(str(ROOT) + "/", "")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> tuple[dict[str, str], set[str]]:
    """(relative file path -> sha256, relative folder paths), hidden entries included."""
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs.update(str(rel / d) for d in dirnames)
        for f in filenames:
            files[str(rel / f)] = sha(Path(dirpath) / f)
    return files, dirs


def masked(path: Path) -> str:
    """File content with wall-clock durations removed (JSON keys in TIME_KEYS, 'N.N s' in text)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        def drop(v):
            if isinstance(v, dict):
                return {k: drop(x) for k, x in v.items() if k not in TIME_KEYS}
            return [drop(x) for x in v] if isinstance(v, list) else v
        return json.dumps(drop(json.loads(text)), sort_keys=True)
    return TIME_RE.sub("<t> s", text)


def setup(run: Path, inputs: Path | None) -> None:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if inputs is not None:
        shutil.copytree(inputs, run / "art")


def timed(argv: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(argv, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                            check=False).returncode
    return rc, time.perf_counter() - t0


def phase(name: str, run: Path) -> str:
    """Which phase the kill hit, from the files it left (the process is dead: the tree is frozen)."""
    if name.startswith("calibrate"):
        work, out = run / ".cal.partial", run / "cal"
        if out.exists():
            return "after the artifact rename (cleanup)"
        if (run / ".cal.tmp").exists():
            return "writing the artifact"
        if not work.exists():
            return "start-up / model load"
        if not (work / "data" / "manifest.json").exists():
            return "data collection" + (" (shards in a temp folder)" if any(work.glob(".data.*.tmp")) else "")
        info = work / "ckpt.json"
        if not info.exists():
            return "quantize + activation init" if "ptq" in name else "QLoRA setup (quantize, act init, LoRA)"
        ck = json.loads(info.read_text())
        writing = " (writing checkpoint)" if any(work.glob(".*.tmp")) else ""
        if "epochs_done" in ck:
            return f"QLoRA epoch {ck['epochs_done'] + 1}{writing}"
        return f"reconstruction block {ck['blocks_done'] + 1}{writing}"
    if name == "export":
        onnx = run / "art" / "onnx"
        fp = list(onnx.glob(".fp-*")) if onnx.exists() else []
        done = [t for t in ("tensorrt", "onnxruntime-cpu") if (onnx / t).exists()]
        if any(onnx.glob(".tensorrt-*")) or any(onnx.glob(".onnxruntime-cpu-*")):
            return "writing a target folder"
        if fp and (fp[0] / "fp32.onnx").exists():
            return f"Q/DQ graph build ({len(done)} of 2 targets written)"
        if fp:
            return "torch ONNX export (FP graph)"
        return "start-up / artifact load / recording calibration calls"
    eng = list((run / "art").glob(".engine-*"))
    if (run / "art" / "engine").exists():
        return "after the engine rename"
    return "ONNX Runtime optimize / writing the engine" if eng else "start-up / verify artifact and export"


def compare(ref: dict[str, str], ref_dirs: set[str], run: Path, volatile: set[str], ref_tree: Path) -> dict:
    files, dirs = snapshot(run)
    missing = sorted(set(ref) - set(files))
    extra = sorted((set(files) - set(ref)) | (dirs - ref_dirs))
    differ = sorted(f for f in ref if f in files and files[f] != ref[f])
    real = [f for f in differ if f not in volatile or masked(run / f) != masked(ref_tree / f)]
    return {"missing": missing, "leftovers": extra, "bytes_differ": differ, "content_differs": real,
            "identical": not missing and not real, "bytes_identical": not missing and not differ}


def run_command(name: str, spec: dict, kills: int, rng: random.Random, run: Path, keep: Path,
                control: bool, log: Path) -> dict:
    inputs = {"calibrated": keep / "calibrated", "exported": keep / "exported"}.get(spec["input"])
    setup(run, inputs)
    rc, ref_s = timed(spec["argv"], log, 3600)
    if rc != 0:
        raise SystemExit(f"error: the reference run of '{name}' failed (rc {rc}); see {log}")
    ref, ref_dirs = snapshot(run)
    ref_tree = keep / f"ref-{name.replace(' ', '_')}"
    shutil.copytree(run, ref_tree)
    if name == "calibrate sa-ptq":
        shutil.copytree(run / "cal", keep / "calibrated")
    if name == "export":
        shutil.copytree(run / "art", keep / "exported")
    res = {"command": shown(spec["argv"], run), "reference_s": round(ref_s, 2), "files": sorted(ref), "kills": []}
    volatile: set[str] = set()
    if control:
        setup(run, inputs)
        rc, ctl_s = timed(spec["argv"], log, 3600)
        files, _ = snapshot(run)
        volatile = {f for f in ref if files.get(f) != ref[f]}
        unmasked = sorted(f for f in volatile if f in files and masked(run / f) != masked(ref_tree / f))
        res["control"] = {"rc": rc, "seconds": round(ctl_s, 2), "bytes_differ": sorted(volatile),
                          "differ_after_masking_times": unmasked}
    else:  # without a control run, treat every JSON/markdown file as possibly carrying wall times
        volatile = {f for f in ref if f.endswith((".json", ".md"))}
    for i in range(kills):
        span, killed = ref_s * 0.97, False
        for attempt in range(3):  # a run faster than the reference can end before its moment: draw again
            setup(run, inputs)
            at = span * (i + rng.random()) / kills if attempt == 0 else span * rng.random()
            with open(log, "ab") as f:
                f.write(f"\n=== {name}: kill {i + 1} (attempt {attempt + 1}) at {at:.2f} s ===\n".encode())
                t0 = time.perf_counter()
                proc = subprocess.Popen(spec["argv"], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                while proc.poll() is None and time.perf_counter() - t0 < at:
                    time.sleep(0.01)
                killed = proc.poll() is None
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kill_s = time.perf_counter() - t0
            if killed:
                break
            span = 0.8 * kill_s
        hit = phase(name, run) if killed else f"finished before the kill (rc {proc.returncode})"
        left_at_kill = sorted(set().union(*snapshot(run)) - set(ref) - ref_dirs)
        # killed after its work was done (only interpreter exit left): the output is already the
        # reference, and calibrate then rightly refuses to overwrite it
        at_kill = compare(ref, ref_dirs, run, volatile, ref_tree)
        complete = killed and at_kill["identical"] and not at_kill["leftovers"]
        hit += " (output already complete)" if complete else ""
        log_pos = log.stat().st_size
        rc, rerun_s = timed(spec["argv"], log, max(600, 10 * ref_s)) if killed else (proc.returncode, 0.0)
        notes = [ln for ln in log.read_bytes()[log_pos:].decode(errors="replace").splitlines()
                 if ln.startswith(("removed", "error:", "note:"))]
        cmp = compare(ref, ref_dirs, run, volatile, ref_tree)
        refused = rc != 0 and complete and any("already exists" in n for n in notes)
        entry = {"at_s": round(kill_s, 2), "killed": killed, "attempts": attempt + 1, "phase": hit,
                 "rerun_rc": rc, "rerun_ok": rc == 0 or refused, "rerun_s": round(rerun_s, 2), "lost_s": round(kill_s + rerun_s - ref_s, 2),
                 "left_at_kill": left_at_kill, "rerun_notes": notes, **cmp}
        res["kills"].append(entry)
        print(f"{name}: kill {i + 1}/{kills} at {kill_s:.1f}s [{hit}] rerun rc={rc} "
              f"identical={cmp['identical']} leftovers={len(cmp['leftovers'])} lost={entry['lost_s']:.1f}s",
              file=sys.stderr, flush=True)
    return res


def summary(res: dict) -> dict:
    ks = [k for k in res["kills"] if k["killed"]]
    lost = [k["lost_s"] for k in ks]
    return {"kills": len(ks), "identical": sum(k["identical"] and k["rerun_ok"] for k in ks),
            "bytes_identical": sum(k["bytes_identical"] for k in ks),
            "leftovers": sum(bool(k["leftovers"]) for k in ks), "rerun_failed": sum(not k["rerun_ok"] for k in ks),
            "median_lost_s": round(statistics.median(lost), 1) if lost else None,
            "max_lost_s": round(max(lost), 1) if lost else None}


def render(data: dict) -> str:
    tot = data["total"]
    met = lambda ok: "**met**" if ok else "**not met**"
    lines = ["# Fault injection: kill -9 and re-run", "",
             f"Command: `{data['invocation']}`  ", f"Machine: {data['machine']}. The cores are shared with other "
             "jobs, so durations (and time lost) are noisy: compare the reference and control durations of the same "
             "command; load average at start: " + data["load"] + ".", "",
             ("Each kill: start the command, SIGKILL its process group at a random moment inside the reference "
             "duration, re-run the same command to completion, compare every file with an uninterrupted run. "
             "*Identical* = every reference file present and byte-identical, except that wall-clock fields "
             f"(JSON keys {', '.join(sorted(TIME_KEYS))}; `N.N s` in report.md) are masked in the files that the "
             "control run (a second uninterrupted run) shows differ between two clean runs anyway. "
             "*Leftover* = any file or folder not in the reference tree (temp folders, `.partial`, `.tmp`, ...). "
             "Time lost = kill moment + re-run time − reference time."), "",
             ("| command | reference s | control s | kills | identical | bytes identical | left anything | re-run failed | "
             "median lost s | max lost s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["commands"].items():
        s = r["summary"]
        ctl = f"{r['control']['seconds']:.1f}" if "control" in r else "-"
        lines.append(f"| {name} | {r['reference_s']:.1f} | {ctl} | {s['kills']} | {s['identical']} | {s['bytes_identical']} "
                     f"| {s['leftovers']} | {s['rerun_failed']} | {s['median_lost_s']} | {s['max_lost_s']} |")
    lines += [(f"| **total** | | | {tot['kills']} | {tot['identical']} | {tot['bytes_identical']} | {tot['leftovers']} "
              f"| {tot['rerun_failed']} | {tot['median_lost_s']} | {tot['max_lost_s']} |"), "",
              (f"- target: every run identical to the uninterrupted one: {met(tot['identical'] == tot['kills'])} "
              f"({tot['identical']}/{tot['kills']})"),
              (f"- every file byte-identical with nothing masked: {met(tot['bytes_identical'] == tot['kills'])} "
              f"({tot['bytes_identical']}/{tot['kills']}): the calibrated state, the ONNX files and the engine are "
              "byte-identical in every run (the bytes that differed: "
              f"{', '.join(sorted({f for r in data['commands'].values() for k in r['kills'] for f in k['bytes_differ']}))}"
              "); what differs is the wall time recorded there, "
              "which differs between two uninterrupted runs just as much (control runs below)"),
              f"- target: no run leaves anything behind: {met(tot['leftovers'] == 0)} ({tot['leftovers']} did)",
              f"- at least 20 kills: {met(tot['kills'] >= 20)}", ""]
    for name, r in data["commands"].items():
        lines += [f"## {name}", "", f"`{r['command']}`", ""]
        if "control" in r:
            c = r["control"]
            lines += [(f"Control run ({c['seconds']:.1f} s): files whose bytes differ between two uninterrupted runs: "
                      f"{', '.join(f'`{f}`' for f in c['bytes_differ']) or 'none'}; still differing once wall "
                      f"times are masked: {', '.join(c['differ_after_masking_times']) or 'none'}."), ""]
        lines += [("| # | kill at s | phase hit | re-run rc | re-run s | lost s | identical | leftovers | "
                  "re-run said |"), "|---|---|---|---|---|---|---|---|---|"]
        for i, k in enumerate(r["kills"], 1):
            bad = ", ".join(k["content_differs"] + [f"missing {m}" for m in k["missing"]])
            lines.append(f"| {i} | {k['at_s']:.1f} | {k['phase']} | {k['rerun_rc']} | {k['rerun_s']:.1f} | "
                         f"{k['lost_s']:.1f} | {'yes' if k['identical'] else 'no: ' + bad} | "
                         f"{', '.join(k['leftovers']) or 'none'} | {'; '.join(k['rerun_notes']) or ''} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="total kills, spread evenly over the commands")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/faults.md", help="markdown (JSON beside it)")
    ap.add_argument("--commands", default="all", help="comma list: sa-ptq,sa-qlora,export,build-engine")
    ap.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run per command")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON beside --out")
    args = ap.parse_args()
    if args.render_only:
        args.out.write_text(render(json.loads(args.out.with_suffix(".json").read_text())) + "\n")
        return
    if args.kills < 1:
        raise SystemExit(f"error: --kills must be >= 1, got {args.kills}")
    work = args.work or Path(tempfile.mkdtemp(prefix="saq-faults-"))
    run, keep, log = work / "run", work / "keep", work / "commands.log"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    specs = commands(work, run)
    asked = set(specs) if args.commands == "all" else {
        n for n in specs for c in args.commands.split(",") if n.endswith(c.strip())}
    # export consumes the SA-PTQ artifact and build-engine the exported one: run those first
    asked |= {"calibrate sa-ptq"} if asked & {"export", "build-engine"} else set()
    asked |= {"export"} if "build-engine" in asked else set()
    wanted = [n for n in specs if n in asked]
    rng = random.Random(args.seed)
    per = {n: args.kills // len(wanted) + (i < args.kills % len(wanted)) for i, n in enumerate(wanted)}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    out: dict[str, dict] = {}
    for name in wanted:
        out[name] = run_command(name, specs[name], per[name], rng, run, keep, not args.no_control, log)
        out[name]["summary"] = summary(out[name])
    allk = [k for r in out.values() for k in r["kills"] if k["killed"]]
    total = summary({"kills": allk})
    data = {"invocation": "python benchmarks/faults.py " + " ".join(sys.argv[1:]), "seed": args.seed,
            "machine": f"{cpu_model()}, nproc {len(os.sched_getaffinity(0))} (of {os.cpu_count()} CPUs), {platform.system()} {platform.machine()}, "
                       "OMP_NUM_THREADS=1", "load": load, "total": total, "commands": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    args.out.write_text(render(data) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}: {total}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
