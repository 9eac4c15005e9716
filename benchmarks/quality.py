"""Quality of calibration methods on builtin:digits: method x bits x sampler x steps.

Usage (defaults = the full table):
  python benchmarks/quality.py [--n 500] [--methods minmax,percentile,mse,brecq,sa-ptq]
      [--bits w8a8,w4a8,w4a4] [--samplers ddim,dpm-solver-2,dpmpp-2m] [--steps 5,10,20]
      [--iters 300] [--calib-steps 10] [--spacing quadratic]
  (methods also: sa-qlora, qlora-mse -- trained from calibration/digits_<bits>_<method>.toml into runs/qlora/)

Every sampler runs on the same time-quadratic grid as the calibration data (so a quantized DDIM
step and the FP DPM-Solver-2 step share their outer points). Per row: digit-FID, IS, accuracy,
PSNR of final samples vs the FP model at the same sampler/steps/seeds, and the paper's claim:
MSE between the final samples of the quantized first-order sampler (DDIM-N) and the FP
second-order trajectory (DPM-Solver-2-N) from the same x_T.
Artifacts are cached under runs/quality/ (re-used when their recipe matches); results are written
after every row to docs/results/quality.{json,md}."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_report import render


def calibrated(method: str, bits: str, args) -> tuple[Path, float]:
    """The artifact for (method, bits), calibrated once and re-used while its recipe matches.

    QLoRA methods train from their committed recipe into runs/qlora/ (so an artifact made with
    `saq-deploy calibrate -c calibration/digits_<bits>_<method>.toml -o runs/qlora/digits_<bits>_<method>`
    is picked up); the others share calibration/digits_<bits>_<base>.toml with this run's overrides."""
    from saq_deploy.calibrate.recipe import load_recipe

    overrides = {"calibration.steps": args.calib_steps, "calibration.spacing": args.spacing}
    if method in ("sa-qlora", "qlora-mse"):
        out = ROOT / "runs/qlora" / f"digits_{bits}_{method}"
        recipe = load_recipe(ROOT / "calibration" / f"digits_{bits}_{method}.toml").with_overrides(overrides)
    else:
        out = ROOT / "runs/quality" / f"{bits}-{method}-s{args.calib_steps}-i{args.iters}"
        base = method if method in ("brecq", "sa-ptq") else "minmax"  # observer-only methods share a recipe
        recipe = load_recipe(ROOT / "calibration" / f"digits_{bits}_{base}.toml").with_overrides({
            **overrides, "calibration.method": method, "reconstruction.iters": args.iters})
    return _cached_calibration(recipe, out)


def _cached_calibration(recipe, out: Path) -> tuple[Path, float]:
    from saq_deploy.calibrate.run import calibrate

    # compare as JSON: recipe.json holds lists where the recipe holds tuples
    if (out / "recipe.json").exists() and \
            json.loads((out / "recipe.json").read_text()) == json.loads(json.dumps(recipe.to_dict())):
        return out, json.loads((out / "manifest.json").read_text())["wall_time_s"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    calibrate(recipe, out)
    return out, time.perf_counter() - t0


def run_samples(eps_model, m, sampler: str, steps: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    from saq_deploy.generate import SampleSettings, generate

    s = SampleSettings(sampler=sampler, steps=steps, cfg=args.cfg, seed=args.seed, n=args.n,
                       spacing=args.spacing, batch_size=250)
    return generate(eps_model, m.schedule(), m.sample_shape, s, num_classes=m.num_classes,
                    null_label=m.null_label)


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.eval.metrics import evaluate_samples, mse
    from saq_deploy.models.loading import load_model
    from saq_deploy.utils.io import write_json_atomic
    from saq_deploy.utils.versions import package_versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--methods", default="minmax,percentile,mse,brecq,sa-ptq")
    ap.add_argument("--bits", default="w8a8,w4a8,w4a4")
    ap.add_argument("--samplers", default="ddim,dpm-solver-2,dpmpp-2m")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--spacing", default="quadratic")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=1000)  # seeds disjoint from calibration (seed 0..63)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/quality")
    ap.add_argument("--append", action="store_true", help="add rows to an existing table (e.g. another method)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args(argv)
    if args.render_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(render(data["meta"], data["rows"]))
        return
    samplers, steps_list = args.samplers.split(","), [int(s) for s in args.steps.split(",")]
    meta = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads",
            "versions": package_versions(), **{k: v for k, v in vars(args).items() if k != "out"}}
    rows: list[dict] = []
    if args.append and args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        new = {(m, b) for m in args.methods.split(",") for b in args.bits.split(",")}
        rows = [r for r in old["rows"] if (r["method"], r["bits"]) not in new]
        meta = {**old["meta"], "appended": [*old["meta"].get("appended", []), meta["command"]]}
    fp_model = load_model("builtin:digits")
    fp_eps = fp_model.eps_model()
    fp_final: dict[tuple[str, int], torch.Tensor] = {}

    def flush():
        write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
        from saq_deploy.utils.io import atomic_path

        with atomic_path(args.out.with_suffix(".md")) as tmp:
            tmp.write_text(render(meta, rows))

    needed = set(samplers) | {"ddim", "dpm-solver-2"}
    for sampler in sorted(needed):
        for steps in steps_list:
            fp_final[(sampler, steps)], labels = run_samples(fp_eps, fp_model, sampler, steps, args)
    for sampler in samplers:
        for steps in steps_list:
            if any(r["method"] == "fp32" and r["sampler"] == sampler and r["steps"] == steps for r in rows):
                continue
            x = fp_final[(sampler, steps)]
            row = {"method": "fp32", "bits": "fp32", "sampler": sampler, "steps": steps,
                   **evaluate_samples(x, labels), "psnr_vs_fp": float("inf"),
                   "mse_to_fp_dpm2": mse(fp_final[("ddim", steps)], fp_final[("dpm-solver-2", steps)])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    flush()
    for bits in args.bits.split(","):
        for method in args.methods.split(","):
            path, calib_s = calibrated(method, bits, args)
            q = load_artifact(path)
            q_eps = q.eps_model()
            for steps in steps_list:
                for sampler in samplers:
                    x, _ = run_samples(q_eps, q.loaded, sampler, steps, args)
                    ref = fp_final[(sampler, steps)]
                    met = evaluate_samples(x, labels, reference_images=ref)
                    met["psnr_vs_fp"] = met.pop("psnr")
                    row = {"method": method, "bits": bits, "sampler": sampler, "steps": steps,
                           **met, "calib_s": round(calib_s, 1)}
                    if sampler == "ddim":
                        row["mse_to_fp_dpm2"] = mse(x, fp_final[("dpm-solver-2", steps)])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    flush()
    flush()


if __name__ == "__main__":
    main()
