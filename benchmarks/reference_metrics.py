"""FP metrics of builtin:digits for the model card: digit-FID, IS, precision/recall, accuracy.

Usage: python benchmarks/reference_metrics.py [--n 1000] [--samplers ddim,dpmpp-2m] [--steps 10,20]
Writes docs/results/reference-fp.md and .json (command, machine, versions, settings, figures).
The "real digits" row is the noise floor: 1,000 real digits drawn with the same seed, scored
exactly like the samples (FID against the statistics of all 1,797)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def real_floor(n: int, seed: int) -> dict:
    from saq_deploy.eval.metrics import evaluate_samples
    from saq_deploy.reference.data import load_digits_16

    x, y = load_digits_16()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return evaluate_samples(x[idx], y[idx])


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.api import evaluate_model
    from saq_deploy.generate import SampleSettings
    from saq_deploy.utils.io import write_json_atomic
    from saq_deploy.utils.versions import package_versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samplers", default="ddim,dpmpp-2m,dpm-solver-2,plms,unipc")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/reference-fp")
    args = ap.parse_args(argv)
    rows = [{"sampler": "real digits", "steps": "-", "nfe": "-", **real_floor(args.n, args.seed)}]
    for sampler in args.samplers.split(","):
        for steps in map(int, args.steps.split(",")):
            t0 = time.perf_counter()
            res = evaluate_model("builtin:digits", SampleSettings(sampler=sampler, steps=steps, cfg=args.cfg,
                                                                  seed=args.seed, n=args.n, batch_size=250))
            nfe = 2 * steps if sampler == "dpm-solver-2" else steps + 1 if sampler == "plms" else steps
            rows.append({"sampler": sampler, "steps": steps, "nfe": nfe, **res["metrics"],
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads",
            "versions": package_versions(), "cfg": args.cfg, "seed": args.seed, "n": args.n}
    write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = [f"# builtin:digits, FP32: sample quality (CFG {args.cfg}, {args.n} samples, seed {args.seed})", "",
             f"Command: `{meta['command']}`  ",
             (f"Machine: {meta['machine']}; torch {meta['versions']['torch']}, "
              f"diffusers {meta['versions']['diffusers']}"), "",
             ("digit-FID: Fréchet distance in the digit classifier's 128-d penultimate feature space against "
              "all 1,797 real digits (lower is better); IS from its class probabilities (max 10); "
              "precision/recall: k-NN manifolds, k=3; accuracy: classifier agrees with the conditioning label."),
             "", "| sampler | steps | NFE | digit-FID | IS | precision | recall | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['digit_fid']:.3f} | "
                     f"{r['inception_score']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} |")
    from saq_deploy.utils.io import atomic_path

    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
