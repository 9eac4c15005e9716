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


def _verdict(claim: str, checks: list[bool], unit: str) -> list[str]:
    """One target line, met only when every measured setting meets it (nothing measured: no line)."""
    if not checks:
        return []
    met = sum(checks)
    return [f"- {claim} — **{'met' if met == len(checks) else 'not met'}** in {met}/{len(checks)} {unit}."]


def _closer_to_dpm2(idx, rows, method: str, other: str, bits_list) -> list[bool]:
    """Per bits x steps: are ``method``'s DDIM-N final samples closer (MSE) to FP DPM-Solver-2-N?"""
    checks = []
    for bits in bits_list:
        for steps in sorted({r["steps"] for r in rows}):
            a, b = idx.get((method, bits, "ddim", steps)), idx.get((other, bits, "ddim", steps))
            if a is not None and b is not None and "mse_to_fp_dpm2" in a:
                checks.append(a["mse_to_fp_dpm2"] < b["mse_to_fp_dpm2"])
    return checks


def _targets(rows) -> list[str]:
    idx = _index(rows)
    configs = sorted({(r["sampler"], r["steps"]) for r in rows if r["method"] == "fp32"})

    def fid(method, bits, cfg):
        r = idx.get((method, bits, *cfg))
        return None if r is None else r["digit_fid"]

    def half_best_delta(method, bits, baselines):
        """Per sampler x steps: method's dFID <= 1/2 of the best baseline's dFID."""
        checks = []
        for cfg in configs:
            fp, q = fid("fp32", "fp32", cfg), fid(method, bits, cfg)
            base = [v for m in baselines if m != method and (v := fid(m, bits, cfg)) is not None]
            if fp is not None and q is not None and base:
                checks.append((q - fp) <= 0.5 * (min(base) - fp))
        return checks

    w4a8_sa_ptq = []  # sa-ptq beats brecq and minmax
    for cfg in configs:
        sa, br, mm = fid("sa-ptq", "w4a8", cfg), fid("brecq", "w4a8", cfg), fid("minmax", "w4a8", cfg)
        if None not in (sa, br, mm):
            w4a8_sa_ptq.append(sa < br and sa < mm)
    w4a4_qlora = []  # issue 7: recognizable digits at W4A4
    for cfg in configs:
        fp, r = fid("fp32", "fp32", cfg), idx.get(("sa-qlora", "w4a4", *cfg))
        if fp is not None and r is not None:
            w4a4_qlora.append(r["digit_fid"] <= 2 * fp and r.get("accuracy", 0.0) >= 0.9)
    quant_bits = sorted({r["bits"] for r in rows if r["bits"] != "fp32"})
    # for sa-qlora at W4A8 every other method is a baseline, the plain-MSE QLoRA included
    w4a8_methods = sorted({r["method"] for r in rows if r["bits"] == "w4a8"})
    return [
        *_verdict("W8A8: sa-ptq ΔFID ≤ ½ best baseline ΔFID", half_best_delta("sa-ptq", "w8a8", BASELINES),
                  "sampler×steps settings"),
        *_verdict("W4A8: sa-ptq FID below brecq and minmax", w4a8_sa_ptq, "settings"),
        *_verdict("MOTA: quantized DDIM-N final samples closer (MSE) to FP DPM-Solver-2-N than brecq's",
                  _closer_to_dpm2(idx, rows, "sa-ptq", "brecq", quant_bits), "bits×steps settings"),
        *_verdict("W4A8: sa-qlora ΔFID ≤ ½ best baseline ΔFID", half_best_delta("sa-qlora", "w4a8", w4a8_methods),
                  "sampler×steps settings"),
        *_verdict("W4A4: sa-qlora digit-FID ≤ 2× FP and accuracy ≥ 90 %", w4a4_qlora, "sampler×steps settings"),
        *_verdict("MOTA (QLoRA): sa-qlora DDIM-N final samples closer (MSE) to FP DPM-Solver-2-N than qlora-mse's",
                  _closer_to_dpm2(idx, rows, "sa-qlora", "qlora-mse", ("w4a8", "w4a4")), "bits×steps settings"),
    ]


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
