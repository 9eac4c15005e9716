"""Which sampler call breaks W4A4? Quality when the first calls (t >= threshold) use the FP model.

    python benchmarks/first_call.py runs/qlora/digits_w4a4_sa-qlora runs/quality/w4a4-mse-s10-i300

Per artifact: DDIM 10 steps (quadratic grid, CFG 1.5, 100 samples from seed 1000, the quality
table's settings), with the fake-quant model everywhere, then with the FP model for the calls at
t >= 990 (only the first, t = 999) and t >= 800 (the first two). Also the eps error of the t = 999
call itself on the same x_T (RMS and max |d eps| vs FP). Writes docs/results/first_call.{json,md}.
This is a diagnostic (hybrid models are not deployable); it backs finding 7 of
benchmarks/quality_findings.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (None, 990.0, 800.0)  # None: the quantized model for every call


def hybrid(q_eps, fp_eps, threshold: float | None):
    """eps(x, t, cond): the FP model for samples at t >= threshold, the quantized one otherwise."""

    def eps(x, t, cond=None):
        out = q_eps(x, t, cond)
        mask = torch.zeros_like(t, dtype=torch.bool) if threshold is None else t >= threshold
        if mask.any():
            out[mask] = fp_eps(x[mask], t[mask], None if cond is None else cond[mask])
        return out

    return eps


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.eval.metrics import evaluate_samples
    from saq_deploy.generate import SampleSettings, generate, initial_noise
    from saq_deploy.models.guidance import ClassifierFreeGuidance
    from saq_deploy.models.loading import load_model
    from saq_deploy.utils.io import atomic_path, write_json_atomic

    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/first_call")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = load_model("builtin:digits")
    fp_eps = m.eps_model()
    s = SampleSettings(sampler="ddim", steps=10, cfg=1.5, seed=1000, n=args.n, spacing="quadratic", batch_size=250)

    def run(eps):
        return generate(eps, m.schedule(), m.sample_shape, s, num_classes=m.num_classes, null_label=m.null_label)

    fp_x, labels = run(fp_eps)
    rows = [{"artifact": "fp32", "fp_calls": "all", **evaluate_samples(fp_x, labels)}]
    x_T, t_T = initial_noise(m.sample_shape, args.n, s.seed), torch.full((args.n,), 999.0)
    cfg_fp = ClassifierFreeGuidance(fp_eps, s.cfg, m.null_label)
    ref = cfg_fp(x_T, t_T, labels)
    for path in args.artifacts:
        q = load_artifact(path)
        q_eps = q.eps_model()
        d = ClassifierFreeGuidance(q_eps, s.cfg, m.null_label)(x_T, t_T, labels) - ref
        first = {"eps_rms_t999": float(d.pow(2).mean().sqrt()), "eps_max_t999": float(d.abs().max())}
        for thr in THRESHOLDS:
            x, _ = run(hybrid(q_eps, fp_eps, thr))
            met = evaluate_samples(x, labels, reference_images=fp_x)
            rows.append({"artifact": str(path.relative_to(ROOT) if path.is_absolute() else path),
                         "method": q.manifest["method"], "bits": q.manifest["bits"],
                         "fp_calls": "none" if thr is None else f"t >= {thr:g}", **met, **first,
                         "outlier_samples": int((x.flatten(1).abs().max(1).values > 1.5).sum())})
            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/first_call.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json_atomic(args.out.with_suffix(".json"), {"command": command, "rows": rows})
    lines = ["# W4A4: quality with the first sampler calls on the FP model", "", f"Command: `{command}`  ",
             f"Machine: 2 CPU cores; DDIM 10 steps, quadratic grid, CFG 1.5, {args.n} samples from seed 1000.", "",
             ("Diagnostic only: a hybrid model is not deployable. `eps @ t=999`: RMS / max |Δε| of the "
              "quantized CFG ε vs FP at the first call, same x_T. Outlier samples: any |pixel| > 1.5."), "",
             "| artifact | FP for calls | digit-FID | accuracy | PSNR vs FP | outlier samples | eps @ t=999 RMS / max |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| fp32 | all | {rows[0]['digit_fid']:.1f} | {rows[0]['accuracy']:.2f} | – | – | – |")
    for r in rows[1:]:
        lines.append(f"| `{Path(r['artifact']).name}` ({r['method']}) | {r['fp_calls']} | {r['digit_fid']:.1f} | "
                     f"{r['accuracy']:.2f} | {r['psnr']:.1f} | {r['outlier_samples']} | "
                     f"{r['eps_rms_t999']:.4f} / {r['eps_max_t999']:.3f} |")
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
