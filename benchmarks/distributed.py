"""Block-reconstruction speed-up with 1 vs N gloo ranks on CPU (docs/design/distributed.md §4).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py [--ranks 1 2] [--iters 300]

Runs `calibrate` (brecq, builtin:digits, w8a8) under ``torchrun --nproc-per-node N`` for each N,
times the block-reconstruction phase alone (the part that is data-parallel; collection is
sharded too, timed separately), and writes docs/results/distributed.{md,json} with the command,
the machine, and the load average before and after each run: the machine may be shared, which the
figures then carry. One torch thread per rank, so N ranks use N cores."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers, as bad_inputs.py does

from saq_deploy.utils.versions import cpu_model
from tests.helpers import digits_recipe

RESULTS = ROOT / "docs" / "results"


def child(out: Path, recipe: Path) -> None:
    """One rank: calibrate with the reconstruction and the collection timed."""
    import saq_deploy.calibrate.reconstruct as rec
    import saq_deploy.calibrate.trajectory as traj
    from saq_deploy.calibrate.recipe import load_recipe
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.utils.distributed import env_world

    spent = {"reconstruct_s": 0.0, "collect_s": 0.0}

    def timed(fn, key):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return run

    rec.reconstruct_block = timed(rec.reconstruct_block, "reconstruct_s")
    traj.collect_trajectories = timed(traj.collect_trajectories, "collect_s")
    t0 = time.perf_counter()
    art = calibrate(load_recipe(recipe), out / "artifact")
    if env_world().is_rank0:
        manifest = json.loads((art / "manifest.json").read_text())
        (out / "timing.json").write_text(json.dumps({**spent, "total_s": time.perf_counter() - t0,
                                                     "block_losses": manifest["block_losses"]}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("OUT", "RECIPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.toml"
        recipe.write_text(digits_recipe("w8a8", "brecq", num_samples=args.samples, steps=5,
                                        reconstruction={"iters": args.iters, "batch_size": args.batch}))
        for n in args.ranks:
            out = Path(tmp) / f"r{n}"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   __file__, "--child", str(out), str(recipe)]
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            timing = json.loads((out / "timing.json").read_text())
            rows.append({"ranks": n, "wall_s": round(wall, 2), **{k: round(v, 2) for k, v in timing.items()
                                                                   if k.endswith("_s")},
                         "load_before": [round(v, 2) for v in load_before],
                         "load_after": [round(v, 2) for v in os.getloadavg()],
                         "loss_after": [b["loss_after"] for b in timing["block_losses"]]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "loss_after"}), flush=True)
    base = rows[0]
    for r in rows:
        r["reconstruct_speedup"] = round(base["reconstruct_s"] / r["reconstruct_s"], 2)
        r["max_rel_loss_diff"] = max(abs(a - b) / max(abs(b), 1e-12)
                                     for a, b in zip(r["loss_after"], base["loss_after"], strict=True))
    info = {"command": "OMP_NUM_THREADS=1 python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
            "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
            "settings": {"method": "brecq", "bits": "w8a8", "num_samples": args.samples, "steps": 5,
                         "iters": args.iters, "batch_size": args.batch, "torch_threads_per_rank": 1},
            "rows": [{k: v for k, v in r.items() if k != "loss_after"} for r in rows]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["# Data-parallel calibration: 1 vs N gloo ranks on CPU", "",
             f"Command: `{info['command']}`", "", (f"Machine: {info['machine']}. The load average columns "
             "are the 1/5/15-minute averages just before and after each run: this machine is shared "
             "with other work, so the figures carry whatever else ran."), "",
             (f"Recipe: brecq w8a8 on builtin:digits, {args.samples} samples x 5 steps, {args.iters} iterations "
             f"per block, batch {args.batch}, one torch thread per rank."), "",
             ("| ranks | reconstruction s | speed-up | collection s | total s | max rel. diff of block loss "
             "vs 1 rank | load before | load after |"), "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ranks']} | {r['reconstruct_s']} | {r['reconstruct_speedup']}x | {r['collect_s']} | "
              f"{r['wall_s']} | {r['max_rel_loss_diff']:.2g} | {r['load_before']} | {r['load_after']} |" for r in rows]
    lines += ["", ("Reconstruction: each rank trains on its slice of every iteration's batch and the gradients "
              "are all-reduced; the block's input capture and its before/after loss run on every rank "
              "(not split), which bounds the speed-up. Total includes process start and model load.")]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
