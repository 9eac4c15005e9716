"""The sampling-aware testbed: `builtin:digits` where FP second order beats FP first order.

Usage (defaults = the committed table, docs/results/testbed.md):
  python benchmarks/testbed.py [--n 2000] [--seeds 1000,5000] [--steps 5] [--spacing logsnr]
      [--bits w4a8] [--methods minmax,brecq,sa-ptq,qlora-mse,sa-qlora] [--out runs/testbed/part]
  python benchmarks/testbed.py --merge runs/testbed/a.json runs/testbed/b.json --out docs/results/testbed
  python benchmarks/testbed.py --quick --out /tmp/tb   # the CI smoke: n 64, minmax and mse

The grid is DPM-Solver-2's outer grid at N steps (`--spacing`, terminal 0), and every quantized
artifact is calibrated on that grid at that N (its trajectories, and QLoRA's mixstep N, 2N, 4N). A
quantized DDIM-N runs on the same grid, from the same x_T and labels as the FP rows, so it can be
compared with FP DDIM-N (what it replaces) and FP DPM-Solver-2-N (the trajectory MOTA aligns to).
FP rows: DDIM-N and DPM-Solver-2-N at every seed set (their spread is FP's own seed-to-seed
noise), and DDIM-N on each spacing's own default grid (the best first-order grid at the same NFE:
a gain that a grid change gives for free is not the method's). Intervals: 95 %, paired bootstrap
over samples for every difference, ±1.96 bootstrap SE for FID itself.

Targets (issue 13 item 6, first bullet), per quantized row: (a) FID <= FP DDIM-N, (b) FID closes
at least half the FP DDIM-N -> DPM-Solver-2-N gap, (c) its samples are closer (MSE) to FP
DPM-Solver-2-N than FP DDIM-N's own are."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import _cached_calibration
from stats import fid_with_ci, mean_ci, paired_fid_delta, paired_psnr, per_sample_mse, wilson
from testbed_report import merge, render

RECIPES = {m: f"digits_{{bits}}_{m}.toml" for m in ("minmax", "brecq", "sa-ptq", "qlora-mse", "sa-qlora")}
# variants: name -> (base method's recipe, extra overrides); each is one row of the ablation
VARIANTS = {
    "mse": ("minmax", {"calibration.method": "mse"}),  # the observer baseline shares minmax's recipe
    "sa-ptq-reverse": ("sa-ptq", {"calibration.orientation": "intermediate_to_outer"}),
    "sa-qlora-n": ("sa-qlora", {"qlora.mixstep": "N"}),  # only the deployment step count
    "sa-qlora-2stage": ("sa-qlora", {"qlora.same_point_epochs": 10}),  # same order first, then MOTA
    "sa-qlora-40ep": ("sa-qlora", {"qlora.epochs": 40}),  # a longer schedule
    # the W4A8 recipes' LoRA rate (relative to the weight step) at W8A8, where the step is 127/7 times
    # finer, so the LoRA factors move 18x less (the W8A8 recipes scale it back)
    **{f"{m}-lr4b": (m, {"qlora.lr": 2e-2}) for m in ("qlora-mse", "sa-qlora")},
    # K timestep groups of activation steps: deployable as K engines sharing one set of weights
    **{f"{m}-g{k}": (m, {"quant.act_timestep_groups": k}) for m in ("minmax", "qlora-mse", "sa-qlora") for k in (2, 4)},
    # 2 groups [0, 990) at the recipe's activation bits and [990, T) at 8 (docs/design/deployment.md §7.1):
    # W4A4 breaks on the first call(s) at t ~ T, so that call runs at 8-bit activations, same weights
    **{f"{m}-t8": (m, {"quant.act_timestep_bounds": [990], "quant.act_group_bits": [4, 8]})
       for m in ("minmax", "qlora-mse", "sa-qlora")},
    **{f"sa-ptq-w{w:g}": ("sa-ptq", {"calibration.mota_weight": w}) for w in (0.25, 0.5, 0.75)},
    **{f"sa-qlora-w{w:g}": ("sa-qlora", {"calibration.mota_weight": w}) for w in (0.25, 0.5, 0.75)},
    # + the network stage (docs/design/method.md §4.1): 100 joint iterations of batch 32 through the whole
    # UNet, ~5 passes over the testbed's 640 CFG rows; measured on digits_w4a8_sa-ptq.toml (10 steps):
    # 81 s of a 460 s calibration on one CPU thread (final-eps loss -4 %)
    **{f"{m}-net": (m, {"reconstruction.network_iters": 100}) for m in ("sa-ptq", "brecq")},
}


def recipe_for(method: str, bits: str, steps: int, spacing: str, iters: int | None):
    from saq_deploy.calibrate.recipe import load_recipe

    base, extra = VARIANTS.get(method, (method, {}))
    if base not in RECIPES:
        raise SystemExit(f"unknown method {method!r}; valid: {', '.join([*RECIPES, *VARIANTS])}")
    recipe = load_recipe(ROOT / "calibration" / RECIPES[base].format(bits=bits))
    ov = {"calibration.steps": steps, "calibration.spacing": spacing}
    if base in ("qlora-mse", "sa-qlora"):
        ov["qlora.mixstep"] = [steps] if extra.get("qlora.mixstep") == "N" else [steps, 2 * steps, 4 * steps]
    elif base in ("brecq", "sa-ptq") and iters is not None:
        ov["reconstruction.iters"] = iters
    ov.update({k: v for k, v in extra.items() if k != "qlora.mixstep"})
    return recipe.with_overrides(ov)


def calibrated(method: str, args) -> tuple[Path, float]:
    """Calibrate once into runs/testbed/; re-used while the recipe is unchanged (quality.py's cache)."""
    recipe = recipe_for(method, args.bits, args.steps, args.spacing, args.iters)
    if args.full_int8:  # attention matmuls and softmax probabilities quantized too
        recipe = recipe.with_overrides({"quant.attention_matmul": True})
    if args.quick:
        recipe = recipe.with_overrides({"calibration.num_samples": 8})
    tag = f"{args.bits}{'-int8attn' if args.full_int8 else ''}"
    return _cached_calibration(recipe, args.work / f"{tag}-{method}-{args.spacing}{args.steps}"
                                              f"{'-quick' if args.quick else ''}")


def draw(eps, loaded, sampler: str, steps: int, seed: int, args, grid=None, spacing=None,
         clip: bool = False) -> torch.Tensor:
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.schedules.x0 import X0Policy

    s = SampleSettings(sampler=sampler, steps=steps, cfg=args.cfg, seed=seed, n=args.n, spacing=spacing,
                       batch_size=250)
    schedule = loaded.schedule()
    if clip:  # diffusers' clip_sample = True, clip_sample_range = 1 (what DDPMScheduler defaults to)
        schedule = schedule.with_x0(X0Policy(clip_range=1.0))
    images, _ = generate(eps, schedule, loaded.sample_shape, s, num_classes=loaded.num_classes,
                         null_label=loaded.null_label, timesteps=grid)
    return images


def cached(args, key: str, make, prefix: str = "fp") -> torch.Tensor:
    """Samples kept in the work folder, so parallel parts pair against the same FP tensors and
    --pairs compares quantized rows without sampling again (their key holds the artifact's hash)."""
    from saq_deploy.utils.io import atomic_path

    path = args.work / f"{prefix}_{key}_n{args.n}_cfg{args.cfg:g}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(images, tmp)
    return images


def quantized_samples(q, path: Path, method: str, clip: bool, seed: int, args, grid) -> torch.Tensor:
    from saq_deploy.utils.io import sha256_file

    key = f"{method}{'-clip' if clip else ''}_{args.spacing}{args.steps}_seed{seed}_" \
          f"{sha256_file(path / 'calibrated.safetensors')[:12]}"
    return cached(args, key, lambda: draw(q.eps_model(), q.loaded, "ddim", args.steps, seed, args, grid, clip=clip),
                  prefix="q")


def pairwise(pairs: str, labels, args, grid) -> list[dict]:
    """``A:B,...``: paired FID and PSNR differences between two quantized rows (same x_T and labels),
    so "A beats B" gets its own interval instead of two overlapping ones."""
    from saq_deploy.calibrate.artifact import load_artifact

    out = []
    seed = int(args.seeds.split(",")[0])
    clips = (False, True) if args.clip else (False,)
    for pair, clip in [(p, c) for p in pairs.split(",") if p for c in clips]:
        names = pair.split(":")
        xs, feats = [], []
        for method in names:
            path, _ = calibrated(method, args)
            x = quantized_samples(load_artifact(path), path, method, clip, seed, args, grid)
            met, f = score(x, labels, args, seed)
            xs.append(x)
            feats.append(f)
        d = paired_fid_delta(feats[0], feats[1], met["features"], args.resamples, 6)
        gap, gap_ci = mean_ci(per_sample_mse(xs[1], xs[0]), args.resamples, 7)
        out.append({"model": f"{names[0]} vs {names[1]}", "kind": "pair", "sampler": "ddim", "seed": seed,
                    "grid": f"{args.spacing}{args.steps} (testbed){' + clip_sample' if clip else ''}",
                    "fid_delta": d["delta"], "fid_delta_ci": d["ci"], "mse_between": gap, "mse_between_ci": gap_ci})
        print(json.dumps(out[-1]), flush=True)
    return out


def score(images, labels, args, seed: int) -> tuple[dict, np.ndarray]:
    from saq_deploy.eval.features import DigitFeatures

    ext = DigitFeatures()
    feats = np.asarray(ext(images), dtype=np.float64)
    ok = int((torch.as_tensor(ext.probs(images).argmax(1)) == labels).sum())
    fid, lo, hi = fid_with_ci(feats, ext.name, args.resamples, seed)
    return {"n": len(images), "digit_fid": fid, "digit_fid_ci": [lo, hi], "accuracy": ok / len(images),
            "accuracy_ci": list(wilson(ok, len(images))), "features": ext.name}, feats


def paired(x, feats, ref_ddim, ref_dpm2, args, name: str) -> dict:
    """Figures of samples ``x`` against FP DDIM-N and FP DPM-Solver-2-N at the same seeds."""
    f_ddim, f_dpm2 = ref_ddim["feats"], ref_dpm2["feats"]
    d_ddim = paired_fid_delta(feats, f_ddim, name, args.resamples, 1)
    d_dpm2 = paired_fid_delta(feats, f_dpm2, name, args.resamples, 2)
    mse_q = per_sample_mse(x, ref_dpm2["x"])
    mse_fp = per_sample_mse(ref_ddim["x"], ref_dpm2["x"])
    gain, gain_ci = mean_ci(mse_fp - mse_q, args.resamples, 3)  # > 0: closer to DPM-2 than FP DDIM is
    out = {"fid_minus_fp_ddim": d_ddim["delta"], "fid_minus_fp_ddim_ci": d_ddim["ci"],
           "fid_minus_fp_dpm2": d_dpm2["delta"], "fid_minus_fp_dpm2_ci": d_dpm2["ci"],
           "mse_to_fp_dpm2": float(mse_q.mean()), "mse_gain_vs_fp_ddim": gain, "mse_gain_ci": gain_ci}
    out.update({k.replace("vs_fp", "vs_fp_ddim"): v for k, v in paired_psnr(x, ref_ddim["x"], args.resamples, 4).items()})
    out.update({k.replace("vs_fp", "vs_fp_dpm2"): v for k, v in paired_psnr(x, ref_dpm2["x"], args.resamples, 5).items()})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", default="1000,5000")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--spacing", default="logsnr")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--methods", default="minmax,brecq,sa-ptq,qlora-mse,sa-qlora")
    ap.add_argument("--iters", type=int, default=None, help="reconstruction iterations (default: the recipe's)")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--no-fp", action="store_true", help="skip the FP rows (another part has them)")
    ap.add_argument("--clip", action="store_true",
                    help="also an x0-clipped (clip_sample) DDIM row for FP and every method (paired with FP unclipped)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/testbed")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/testbed")
    ap.add_argument("--notes", type=Path, default=None, help="markdown appended below the tables")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="only merge these parts into --out")
    ap.add_argument("--full-int8", action="store_true", help="W8A8 with attention matmuls quantized (quant.attention_matmul)")
    ap.add_argument("--pairs", default="", help="A:B,... paired FID difference between two methods' rows")
    ap.add_argument("--quick", action="store_true", help="CI smoke: n 64, minmax and mse, 8 calibration samples")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: parts run side by side, one per core)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.notes)
    # Parts run in parallel; torch's default (one thread per core in every process) oversubscribes the
    # cores, and OpenMP's spinning then cost 3-15x: a W8A8 QLoRA epoch took 73-390 s with three
    # 2-thread parts on 2 cores, 24 s with two 1-thread parts.
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args, argv)
    finally:  # main() also runs inside pytest (the --quick smoke): leave its thread count as it was
        torch.set_num_threads(before)


def run(args, argv: list[str] | None) -> None:
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.generate import class_labels
    from saq_deploy.models.loading import load_model
    from saq_deploy.samplers.registry import default_grid
    from saq_deploy.schedules.spacing import SPACINGS
    from saq_deploy.utils.io import atomic_path, write_json_atomic
    from saq_deploy.utils.versions import package_versions

    if args.quick:
        args.n, args.methods, args.resamples, args.seeds = 64, "minmax,mse", 8, args.seeds.split(",")[0] + ",1"
        args.pairs = args.pairs or "mse:minmax"
    torch.manual_seed(0)
    fp = load_model("builtin:digits")
    fp_eps = fp.eps_model()
    grid = default_grid("dpm-solver-2", args.steps, fp.schedule(), spacing=args.spacing)[0]
    labels = class_labels(args.n, fp.num_classes, None)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []
    refs: dict[str, dict] = {}
    n_tag = f"{args.spacing}{args.steps}"
    for seed in seeds:
        for sampler in ("ddim", "dpm-solver-2"):
            t0 = time.perf_counter()
            x = cached(args, f"{sampler}_{n_tag}_seed{seed}",
                       lambda sampler=sampler, seed=seed: draw(fp_eps, fp, sampler, args.steps, seed, args, grid))
            met, feats = score(x, labels, args, seed)
            if seed == seeds[0]:
                refs[sampler] = {"x": x, "feats": feats}
            rows.append({"model": "fp32", "sampler": sampler, "grid": f"{n_tag} (testbed)", "seed": seed,
                         **met, "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if not args.no_fp:
        # FP DDIM-N and DPM-Solver-2-N on each spacing's own default grid: the best first-order grid at
        # the same NFE, and whether second order still helps once the grid is the best one
        for sampler, sp in [(m, sp) for m in ("ddim", "dpm-solver-2") for sp in SPACINGS]:
            if sampler == "dpm-solver-2" and sp == args.spacing:
                continue  # that is the testbed grid itself
            x = cached(args, f"{sampler}_{sp}{args.steps}default_seed{seeds[0]}",
                       lambda sampler=sampler, sp=sp: draw(fp_eps, fp, sampler, args.steps, seeds[0], args, spacing=sp))
            met, feats = score(x, labels, args, seeds[0])
            rows.append({"model": "fp32", "sampler": sampler, "grid": f"{sp}{args.steps} ({sampler} default)",
                         "seed": seeds[0], **met, **paired(x, feats, refs["ddim"], refs["dpm-solver-2"], args,
                                                           met["features"])})
            print(json.dumps(rows[-1]), flush=True)
        if args.clip:
            x = cached(args, f"ddim_{n_tag}_clip_seed{seeds[0]}",
                       lambda: draw(fp_eps, fp, "ddim", args.steps, seeds[0], args, grid, clip=True))
            met, feats = score(x, labels, args, seeds[0])
            rows.append({"model": "fp32", "sampler": "ddim", "grid": f"{n_tag} (testbed) + clip_sample",
                         "seed": seeds[0], **met, **paired(x, feats, refs["ddim"], refs["dpm-solver-2"], args,
                                                           met["features"])})
            print(json.dumps(rows[-1]), flush=True)
    else:
        rows = []  # the FP rows come from the part that ran them; refs were only needed for pairing
    for method in [m for m in args.methods.split(",") if m]:
        path, calib_s = calibrated(method, args)
        q = load_artifact(path)
        for clip in (False, True) if args.clip else (False,):
            t0 = time.perf_counter()
            x = quantized_samples(q, path, method, clip, seeds[0], args, grid)
            met, feats = score(x, labels, args, seeds[0])
            rows.append({"model": method + (" + clip_sample" if clip else ""),
                         "bits": args.bits + (" full-INT8" if args.full_int8 else ""), "sampler": "ddim",
                         "grid": f"{n_tag} (testbed)", "seed": seeds[0], **met,
                         **paired(x, feats, refs["ddim"], refs["dpm-solver-2"], args, met["features"]),
                         "calib_s": round(calib_s, 1), "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    rows += pairwise(args.pairs, labels, args, grid)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    meta = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]
                                            if argv is None else [f"benchmarks/{Path(__file__).name}", *argv]),
            "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads, "
                       f"load average at the end {' '.join(load)}",
            "versions": package_versions(), "n": args.n, "steps": args.steps, "spacing": args.spacing,
            "bits": args.bits + (" full-INT8 (attention matmuls quantized)" if args.full_int8 else ""), "cfg": args.cfg, "seeds": seeds, "grid": [float(t) for t in grid]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(render(meta, rows))


if __name__ == "__main__":
    main()
