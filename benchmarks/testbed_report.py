"""Markdown for benchmarks/testbed.py: the FP rows, the quantized rows and each target, met or not."""

from __future__ import annotations

import json
from pathlib import Path


def _ci(v, ci, fmt="{:.2f}") -> str:
    return f"{fmt.format(v)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _targets(r: dict, fp_ddim: dict, fp_dpm2: dict) -> dict[str, str]:
    """(a) FID <= FP DDIM-N; (b) closes >= half of the FP DDIM -> DPM-Solver-2 gap; (c) closer to FP
    DPM-Solver-2 than FP DDIM is. 'met' needs the point estimate; 'resolved' needs the interval too."""
    gap = fp_ddim["digit_fid"] - fp_dpm2["digit_fid"]
    d, (lo, hi) = r["fid_minus_fp_ddim"], r["fid_minus_fp_ddim_ci"]
    half = -0.5 * gap  # target (b): FID - FP DDIM <= -gap/2

    def verdict(ok: bool, resolved: bool) -> str:
        return ("**met**" if ok else "not met") + ("" if resolved else " (within the CI)")

    g, (glo, ghi) = r["mse_gain_vs_fp_ddim"], r["mse_gain_ci"]
    return {"a": verdict(d <= 0, hi <= 0 or lo > 0),
            "b": verdict(d <= half, hi <= half or lo > half),
            "c": verdict(g > 0, glo > 0 or ghi < 0)}


def render(meta: dict, rows: list[dict]) -> str:
    seeds = meta["seeds"]
    fp = {(r["sampler"], r["seed"]): r for r in rows if r["model"] == "fp32" and r["grid"].endswith("(testbed)")}
    lines = [f"# Testbed: `builtin:digits` at {meta['steps']} steps, {meta['spacing']} grid, {meta['bits']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             (f"n = {meta['n']} per row, CFG {meta['cfg']}, labels cycling 0-9; outer grid "
             f"{[round(t, 1) for t in meta['grid']]} (DPM-Solver-2's, terminal 0). 95 % intervals: FID "
             "±1.96 bootstrap SE; differences paired over the same samples."), "",
             "## FP32", "", "| sampler | grid | seed | NFE | digit-FID | accuracy | FID − FP DDIM (paired) | PSNR vs FP DPM-2 (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] != "fp32":
            continue
        nfe = meta["steps"] * (2 if r["sampler"] == "dpm-solver-2" else 1)
        delta = _ci(r["fid_minus_fp_ddim"], r["fid_minus_fp_ddim_ci"]) if "fid_minus_fp_ddim" in r else ""
        psnr = _ci(r["psnr_vs_fp_dpm2"], r["psnr_vs_fp_dpm2_ci"]) if "psnr_vs_fp_dpm2" in r else ""
        lines.append(f"| {r['sampler']} | {r['grid']} | {r['seed']} | {nfe} | {_ci(r['digit_fid'], r['digit_fid_ci'])} "
                     f"| {_ci(r['accuracy'], r['accuracy_ci'], '{:.3f}')} | {delta} | {psnr} |")
    if all(("ddim", s) in fp and ("dpm-solver-2", s) in fp for s in seeds):
        spread = [abs(fp[("ddim", seeds[0])]["digit_fid"] - fp[("ddim", s)]["digit_fid"]) for s in seeds[1:]]
        gaps = [fp[("ddim", s)]["digit_fid"] - fp[("dpm-solver-2", s)]["digit_fid"] for s in seeds]
        lines += ["", (f"FP DDIM − FP DPM-Solver-2 digit-FID gap per seed set: {', '.join(f'{g:.2f}' for g in gaps)}; "
                  f"FP DDIM's seed-to-seed spread: {', '.join(f'{s:.2f}' for s in spread)}.")]
    q = [r for r in rows if r["model"] != "fp32" and r.get("kind") != "pair"]
    if q and ("ddim", seeds[0]) in fp and ("dpm-solver-2", seeds[0]) in fp:
        lines += ["", f"## Quantized DDIM-{meta['steps']} on the testbed grid (seed {seeds[0]}, paired with FP)", "",
                  ("| method | digit-FID | FID − FP DDIM | FID − FP DPM-2 | PSNR vs FP DDIM | PSNR vs FP DPM-2 "
                  "| MSE gain toward FP DPM-2 (×1e-3) | (a) FID ≤ FP DDIM | (b) half the gap | (c) closer to DPM-2 "
                  "| calib s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in q:
            t = _targets(r, fp[("ddim", seeds[0])], fp[("dpm-solver-2", seeds[0])])
            lines.append(
                f"| {r['model']} | {_ci(r['digit_fid'], r['digit_fid_ci'])} "
                f"| {_ci(r['fid_minus_fp_ddim'], r['fid_minus_fp_ddim_ci'])} "
                f"| {_ci(r['fid_minus_fp_dpm2'], r['fid_minus_fp_dpm2_ci'])} "
                f"| {_ci(r['psnr_vs_fp_ddim'], r['psnr_vs_fp_ddim_ci'])} | {_ci(r['psnr_vs_fp_dpm2'], r['psnr_vs_fp_dpm2_ci'])} "
                f"| {_ci(r['mse_gain_vs_fp_ddim'] * 1e3, [v * 1e3 for v in r['mse_gain_ci']])} "
                f"| {t['a']} | {t['b']} | {t['c']} | {r['calib_s']} |")
        lines += ["", ("(a) FID ≤ FP DDIM-N; (b) FID − FP DDIM ≤ −½ (FP DDIM − FP DPM-2); (c) mean per-sample MSE to "
                  "FP DPM-Solver-2-N below FP DDIM-N's own. \"within the CI\": the paired interval includes the threshold.")]
    pairs = [r for r in rows if r.get("kind") == "pair"]
    if pairs:
        lines += ["", "## Paired comparisons between methods (same x_T and labels)", "",
                  "| A vs B | setting | FID(A) − FID(B), 95 % CI | resolved | mean MSE between their samples |",
                  "|---|---|---|---|---|"]
        for r in pairs:
            lo, hi = r["fid_delta_ci"]
            lines.append(f"| {r['model']} | DDIM-{meta['steps']} {r.get('grid', '')} | {_ci(r['fid_delta'], r['fid_delta_ci'])} | "
                         f"{'yes' if hi < 0 or lo > 0 else 'no'} | {r['mse_between']:.4f} |")
    return "\n".join(lines) + "\n"


def _bits(meta: dict) -> str:
    # rows carry "w8a8 full-INT8", the meta adds an explanation in parentheses
    return meta.get("bits", "").split(" (")[0]


def merge(parts: list[Path], out: Path, notes: Path | None = None) -> None:
    from saq_deploy.utils.io import atomic_path, write_json_atomic

    datas = [json.loads(p.read_text()) for p in parts]
    meta = dict(datas[0]["meta"])
    meta["command"] = "` then `".join(d["meta"]["command"] for d in datas)
    keys, rows = set(), []
    # FP rows from the first part that has them (parts may have sampled FP at other grids or labels)
    fp_part = next((i for i, d in enumerate(datas) if any(r["model"] == "fp32" for r in d["rows"])), None)
    if fp_part is not None:  # the FP seed sets (and FP's spread) are the FP part's
        meta["seeds"] = datas[fp_part]["meta"]["seeds"]
    for i, d in enumerate(datas):
        for r in d["rows"]:
            if r["model"] == "fp32" and i != fp_part:
                continue
            # quantized rows at other bits (e.g. of the W4A8 part a W8A8 table takes its FP rows from) stay out
            if r["model"] != "fp32" and r.get("bits", _bits(d["meta"])) != _bits(meta):
                continue
            k = (r["model"], r["sampler"], r["grid"], r["seed"], r.get("kind"))
            if k not in keys:
                keys.add(k)
                rows.append(r)
    write_json_atomic(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    text = render(meta, rows) + ("\n" + notes.read_text() if notes else "")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
