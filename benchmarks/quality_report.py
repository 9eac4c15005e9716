"""Markdown for benchmarks/quality.py: tables per bit width and the issue's targets, met or not."""

from __future__ import annotations

from pathlib import Path

FINDINGS = Path(__file__).with_name("quality_findings.md")  # hand-written analysis of the figures

BASELINES = ("minmax", "percentile", "mse", "brecq", "modelopt-int8")


def _fmt(v, nd=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "∞" if v == float("inf") else f"{v:.{nd}f}"
    return str(v)


def _index(rows):
    return {(r["method"], r["bits"], r["sampler"], r["steps"]): r for r in rows}


def _targets(rows) -> list[str]:
    idx = _index(rows)
    configs = sorted({(r["sampler"], r["steps"]) for r in rows if r["method"] == "fp32"})
    out = []

    def fid(method, bits, cfg):
        r = idx.get((method, bits, *cfg))
        return None if r is None else r["digit_fid"]

    # 1. W8A8: sa-ptq dFID <= 1/2 of the best baseline's dFID
    met = total = 0
    for cfg in configs:
        fp, sa = fid("fp32", "fp32", cfg), fid("sa-ptq", "w8a8", cfg)
        base = [fid(m, "w8a8", cfg) for m in BASELINES if fid(m, "w8a8", cfg) is not None]
        if fp is None or sa is None or not base:
            continue
        total += 1
        best = min(b - fp for b in base)
        met += (sa - fp) <= 0.5 * best
    if total:
        out.append(f"- W8A8: sa-ptq ΔFID ≤ ½ best baseline ΔFID — **{'met' if met == total else 'not met'}** "
                   f"in {met}/{total} sampler×steps settings.")
    # 2. W4A8: sa-ptq beats brecq and minmax
    met = total = 0
    for cfg in configs:
        sa, br, mm = fid("sa-ptq", "w4a8", cfg), fid("brecq", "w4a8", cfg), fid("minmax", "w4a8", cfg)
        if None in (sa, br, mm):
            continue
        total += 1
        met += sa < br and sa < mm
    if total:
        out.append(f"- W4A8: sa-ptq FID below brecq and minmax — **{'met' if met == total else 'not met'}** "
                   f"in {met}/{total} settings.")
    # 3. MOTA lowers final-sample MSE to the FP second-order trajectory vs brecq (quantized DDIM)
    met = total = 0
    for bits in sorted({r["bits"] for r in rows if r["bits"] != "fp32"}):
        for steps in sorted({r["steps"] for r in rows}):
            sa, br = idx.get(("sa-ptq", bits, "ddim", steps)), idx.get(("brecq", bits, "ddim", steps))
            if sa is None or br is None or "mse_to_fp_dpm2" not in sa:
                continue
            total += 1
            met += sa["mse_to_fp_dpm2"] < br["mse_to_fp_dpm2"]
    if total:
        out.append(f"- MOTA: quantized DDIM-N final samples closer (MSE) to FP DPM-Solver-2-N than brecq's — "
                   f"**{'met' if met == total else 'not met'}** in {met}/{total} bits×steps settings.")
    out += _qlora_targets(rows, idx, configs, fid)
    return out


def _qlora_targets(rows, idx, configs, fid) -> list[str]:
    """Issue 7 (SA-QLoRA): W4A8 ΔFID ≤ ½ best baseline's; W4A4 FID ≤ 2× FP with accuracy ≥ 90 %."""
    out = []
    met = total = 0
    for cfg in configs:  # every other method at W4A8 is a baseline, the plain-MSE QLoRA included
        fp, sa = fid("fp32", "fp32", cfg), fid("sa-qlora", "w4a8", cfg)
        base = [r["digit_fid"] for r in rows if r["bits"] == "w4a8" and r["method"] != "sa-qlora"
                and (r["sampler"], r["steps"]) == cfg]
        if fp is None or sa is None or not base:
            continue
        total += 1
        met += (sa - fp) <= 0.5 * (min(base) - fp)
    if total:
        out.append(f"- W4A8: sa-qlora ΔFID ≤ ½ best baseline ΔFID — **{'met' if met == total else 'not met'}** "
                   f"in {met}/{total} sampler×steps settings.")
    met = total = 0
    for cfg in configs:
        fp, r = fid("fp32", "fp32", cfg), idx.get(("sa-qlora", "w4a4", *cfg))
        if fp is None or r is None:
            continue
        total += 1
        met += r["digit_fid"] <= 2 * fp and r.get("accuracy", 0.0) >= 0.9
    if total:
        out.append(f"- W4A4: sa-qlora digit-FID ≤ 2× FP and accuracy ≥ 90 % — **{'met' if met == total else 'not met'}** "
                   f"in {met}/{total} sampler×steps settings.")
    met = total = 0
    for bits in ("w4a8", "w4a4"):
        for steps in sorted({r["steps"] for r in rows}):
            sa, mse = idx.get(("sa-qlora", bits, "ddim", steps)), idx.get(("qlora-mse", bits, "ddim", steps))
            if sa is None or mse is None or "mse_to_fp_dpm2" not in sa:
                continue
            total += 1
            met += sa["mse_to_fp_dpm2"] < mse["mse_to_fp_dpm2"]
    if total:
        out.append(f"- MOTA (QLoRA): sa-qlora DDIM-N final samples closer (MSE) to FP DPM-Solver-2-N than qlora-mse's — "
                   f"**{'met' if met == total else 'not met'}** in {met}/{total} bits×steps settings.")
    return out


def render(meta: dict, rows: list[dict]) -> str:
    lines = ["# Calibration quality on builtin:digits", "",
             f"Command: `{meta['command']}`  ",
             *[f"Appended: `{c}`  " for c in meta.get("appended", [])],
             f"Machine: {meta['machine']}; torch {meta['versions']['torch']}", "",
             (f"{meta['n']} samples per row (labels cycling 0–9, seeds from {meta['seed']}, disjoint from the "
              f"calibration seeds), CFG {meta['cfg']}, every sampler on the `{meta['spacing']}` grid; artifacts "
              f"calibrated on {meta['calib_steps']}-step DPM-Solver-2 trajectories, {meta['iters']} "
              "reconstruction iterations per block (brecq, sa-ptq); sa-qlora / qlora-mse artifacts from their "
              "committed recipes (`calibration/digits_<bits>_<method>.toml`), fine-tuning time in "
              "`benchmarks/quality_findings.md`."), "",
             ("Columns: digit-FID (lower is better), IS, accuracy of the conditioning label, PSNR of final samples "
              "vs the FP model with the same sampler, steps and x_T, and (DDIM rows) MSE of the final samples to "
              "the FP DPM-Solver-2 trajectory with the same N and x_T — the quantity MOTA targets."), "",
             "## Targets", "", *(_targets(rows) or ["- (no rows yet)"]), ""]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().strip(), ""]
    for bits in ["fp32", *sorted({r["bits"] for r in rows if r["bits"] != "fp32"})]:
        sel = [r for r in rows if r["bits"] == bits]
        if not sel:
            continue
        header = "| method | sampler | steps | digit-FID | IS | accuracy | PSNR vs FP | MSE to FP DPM-2 | calib s |"
        lines += [f"## {bits.upper()}", "", header, "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(sel, key=lambda r: (r["sampler"], r["steps"], r["method"])):
            lines.append(f"| {r['method']} | {r['sampler']} | {r['steps']} | {_fmt(r['digit_fid'], 2)} | "
                         f"{_fmt(r['inception_score'], 2)} | {_fmt(r.get('accuracy'))} | "
                         f"{_fmt(r.get('psnr_vs_fp'), 2)} | {_fmt(r.get('mse_to_fp_dpm2'), 5)} | "
                         f"{_fmt(r.get('calib_s'), 1)} |")
        lines.append("")
    return "\n".join(lines) + "\n"
