"""The comparison report of `calibrate --method auto`: JSON, markdown and a plot."""

from __future__ import annotations

from pathlib import Path

JSON_FILE, REPORT_FILE, PLOT_FILE = "comparison.json", "report.md", "comparison.png"


def _ci(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return f"{stats['mean']:.4g} [{lo:.4g}, {hi:.4g}]"


def lead_line(result: dict) -> str:
    """One sentence: who won, by how much, and whether the interval decides it."""
    lead, crit = result["lead"], result["criterion"]
    if lead is None:
        return f"{result['winner']} (the only candidate that finished)"
    lo, hi = lead["ci95"]
    verdict = "the 95 % interval excludes a tie" if lead["decided"] else \
        f"a tie within the 95 % interval: {result['winner']} is kept as the lower mean"
    return (f"{result['winner']} won on '{crit}' by {100 * lead['relative']:.1f} % over {lead['runner_up']} "
            f"(paired difference {lead['mean']:.3g}, 95 % CI [{lo:.3g}, {hi:.3g}]; {verdict})")


def plot_comparison(result: dict, path: Path) -> None:
    """Mean per-sample MSE with 95 % intervals, one panel per criterion; the winner in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "skipped" not in r]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.8), squeeze=False)
    for ax, crit, title in zip(axes[0], ("fp", "fp-higher-order"),
                               ("to FP, same sampler", f"to FP {result['eval']['higher_order']} (MOTA target)"),
                               strict=True):
        means = [r[crit]["mean"] for r in rows]
        err = [[m - r[crit]["ci95"][0] for m, r in zip(means, rows, strict=True)],
               [r[crit]["ci95"][1] - m for m, r in zip(means, rows, strict=True)]]
        colours = ["tab:green" if n == result["winner"] else "tab:gray" for n in names]
        ax.barh(names, means, xerr=err, color=colours, capsize=3)
        if crit == "fp-higher-order":
            ax.axvline(result["fp_first_to_higher"]["mean"], color="tab:blue", ls="--",
                       label=f"FP {result['eval']['sampler']} itself")
            ax.legend(fontsize=8)
        ax.set_title(f"distance {title}", fontsize=10)
        ax.set_xlabel("mean per-sample MSE (95 % CI)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict) -> str:
    e = result["eval"]
    lines = [f"# Method comparison ({result['bits']}, {result['model']})", "",
             f"**Kept: {lead_line(result)}.**", "",
             (f"Scored on {e['n']} samples (seed {e['seed']}, not the calibration seed) with {e['sampler']} "
             f"{e['steps']} steps, {e['spacing']} spacing, CFG {e['cfg']:g}; distance = mean per-sample MSE of "
             f"the final samples (images in [-1, 1]), 95 % bootstrap intervals. Criterion used for the ranking: "
             f"`{result['criterion']}`."), "",
             "| method | to FP (same sampler) | to FP " + e["higher_order"] + " | calibrate s |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped ({r['skipped']}) | | |")
            continue
        mark = " **(kept)**" if r["method"] == result["winner"] else ""
        lines.append(f"| {r['method']}{mark} | {_ci(r['fp'])} | {_ci(r['fp-higher-order'])} | {r['calibrate_s']} |")
    lines += [f"| FP {e['sampler']} (reference) | 0 | {_ci(result['fp_first_to_higher'])} | |", "",
              f"Wall time of the comparison: {result['wall_s']} s.", "", f"![comparison]({PLOT_FILE})", ""]
    return "\n".join(lines)


def write_comparison(folder: Path, result: dict) -> None:
    from saq_deploy.utils.io import write_bytes_atomic, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / JSON_FILE, result)
    plot_comparison(result, folder / PLOT_FILE)
    write_bytes_atomic(folder / REPORT_FILE, render(result))
