"""Validation report: per-step direction-error plot (PNG) and a markdown summary."""

from __future__ import annotations

import math
from pathlib import Path

PLOT_FILE = "direction-error.png"
REPORT_FILE = "report.md"


def plot_direction_error(steps: list[dict], backend: str, path: Path) -> None:
    """cosine(eps_quant, eps_FP) against the sampling step, one panel per sampler, one line per
    backend (PyTorch fake-quant and the engine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(s["sampler"] for s in steps))
    fig, axes = plt.subplots(1, len(samplers), figsize=(5 * len(samplers), 3.6), squeeze=False)
    for ax, sampler in zip(axes[0], samplers, strict=True):
        rows = [s for s in steps if s["sampler"] == sampler]
        x = list(range(len(rows)))
        ax.plot(x, [r["dir_fakequant"] for r in rows], "o-", label="PyTorch fake-quant")
        ax.plot(x, [r["dir_engine"] for r in rows], "x--", label=backend)
        ax.set_title(f"{sampler}: direction vs FP32")
        ax.set_xlabel("UNet call along the trajectory (high noise -> low)")
        ax.set_ylabel("cosine(eps_quant, eps_FP32)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: float, nd: int = 4) -> str:
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.{nd}f}"


def write_report(out: Path, result: dict) -> None:
    from saq_deploy.utils.io import atomic_path

    plot_direction_error(result["steps_detail"], result["backend"], out / PLOT_FILE)
    m, th = result["metrics"], result["thresholds"]
    lines = [f"# Validation: {result['backend']} engine vs fake-quant PyTorch", "",
             f"- artifact: `{result['artifact']}` ({result['method']}, {result['bits']})",
             f"- engine: `{result['engine']}`",
             f"- gate: **{'PASSED' if result['passed'] else 'FAILED'}**"
             + ("" if result["passed"] else " (" + "; ".join(result["failures"]) + ")"), "",
             "| check | measured | threshold |", "|---|---|---|",
             f"| median cosine | {_f(m['median_cosine'], 6)} | >= {th.get('min_median_cosine')} |",
             f"| 10th-percentile SNR (dB) | {_f(m['p10_snr_db'], 2)} | >= {th.get('min_p10_snr_db')} |",
             f"| mean SNR (dB) | {_f(m['mean_snr_db'], 2)} | >= {th.get('min_mean_snr_db')} |",
             f"| final-sample PSNR (dB), worst sampler | {_f(m['min_psnr_db'], 2)} | >= {th.get('min_psnr_db')} |",
             f"| worst-call cosine / SNR (dB) | {_f(m['min_cosine'], 6)} / {_f(m['min_snr_db'], 2)} | reported |",
             f"| max-abs difference | {_f(m['max_abs'])} | reported |",
             "", "Final-sample PSNR per sampler: "
             + ", ".join(f"{k} {_f(v, 2)} dB" for k, v in m["psnr_db"].items()), "",
             f"![direction error]({PLOT_FILE})", ""]
    if result.get("not_represented"):
        lines += ["What the engine represents differently from the fake-quant model:", ""]
        lines += [f"- {n}" for n in result["not_represented"]] + [""]
    pl = result.get("placement") or {}
    if pl.get("modelled_outputs"):
        cost = pl.get("mean_snr_db_vs_fakequant")
        lines += [f"The reference rounds the {pl['modelled_outputs']} layer outputs the exported graph quantizes "
                  "(export-time scales, read from the graph the engine was built from)"
                  + (f"; those roundings cost {cost:.1f} dB mean SNR vs the plain fake-quant model "
                     "(deployment error: see the quality figures)" if cost is not None else "") + ".", ""]
    elif pl.get("note"):
        lines += [f"Reference: {pl['note']}.", ""]
    if pl.get("not_modelled"):
        lines += [(f"{len(pl['not_modelled'])} export-time-quantized tensor(s) are not modelled in the reference "
                   "(not a layer output): they count as engine error."), ""]
    q = result.get("quality")
    if q:
        lines += [f"## Quality ({q['settings']['n']} samples, DDIM {q['settings']['steps']} steps, CFG 1.5)", "",
                  "| model | digit-FID | IS | accuracy | precision | recall |", "|---|---|---|---|---|---|"]
        for name in ("fp32", "engine"):
            r = q[name]
            lines.append(f"| {name} | {r['digit_fid']:.2f} | {r['inception_score']:.2f} | {r['accuracy']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} |")
        lines.append("")
    elif not result["passed"]:
        floor = result.get("numerical_floor") or {}
        lines += ["No quality figures: the engine failed its parity gate.", ""]
        if floor:
            lines += ["## Numerical floor", "", floor.get("verdict") or floor["note"], ""]
    with atomic_path(out / REPORT_FILE) as tmp:
        Path(tmp).write_text("\n".join(lines))
