"""docs/results/speed.md: the CPU peer tables of the three models side by side, with their quality
columns and issue 14's targets marked, rendered from the JSON the peer benchmarks wrote:

  docs/results/speed-peers.json        python benchmarks/peers.py --artifact ART --fid ...
  docs/results/speed-peers-text.json   python benchmarks/peers.py --model digits-text ... --out .../speed-peers-text
  docs/results/speed-peers-sd15.json   python benchmarks/peers_sd15.py ...

    python benchmarks/peers_summary.py [--notes benchmarks/peers_findings.md]

A table that is missing is said to be missing, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "docs" / "results"
SOURCES = {"builtin:digits": "speed-peers", "builtin:digits-text": "speed-peers-text",
           "SD-1.5-config UNet (random weights, 4x32x32 latent)": "speed-peers-sd15"}
PEERS = ("ort-qstatic", "ov-nncf")


def best_ours(lat: dict) -> str:
    """Our fastest engine in one latency table."""
    return min((k for k in lat if k.startswith("ours-")), key=lambda k: lat[k]["median_ms"])


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _latency_table(res: dict) -> list[str]:
    bs = list(res["latency"])
    names = list(res["latency"][bs[0]])
    head = "| variant | " + " | ".join(f"batch {b} ms (vs ORT FP32)" for b in bs) + " |"
    lines = [head, "|---|" + "---|" * len(bs)]
    for k in names:
        cells = []
        for b in bs:
            lat = res["latency"][b]
            cells.append(f"{lat[k]['median_ms']:.1f} ({lat['ort-fp32']['median_ms'] / lat[k]['median_ms']:.2f}x)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _quality_table(res: dict) -> list[str]:
    q = res["quality"]
    variants = q.get("variants", q)
    fid = "fp32_digit_fid" in q
    sd = "final_latent_snr_db" in next(iter(variants.values()))
    if sd:
        lines = ["| variant | eps SNR median dB | final-latent SNR dB |", "|---|---|---|"]
        for k, v in variants.items():
            lines.append(f"| {k} | {v['snr_median_db']:.1f} | {v['final_latent_snr_db']:.1f} |")
        return lines
    lines = ["| variant | eps SNR median dB | sample PSNR dB |" + (" digit-FID | FID − FP32 (paired) |" if fid else ""),
             "|---|---|---|" + ("---|---|" if fid else "")]
    for k, v in variants.items():
        row = f"| {k} | {v['snr_median_db']:.1f} | {v.get('psnr_db', float('nan')):.1f} |"
        if fid:
            row += (f" {v['digit_fid']:.2f} [{v['digit_fid_ci'][0]:.2f}, {v['digit_fid_ci'][1]:.2f}] |"
                    f" {v['fid_minus_fp']:+.2f} [{v['fid_minus_fp_ci'][0]:+.2f}, {v['fid_minus_fp_ci'][1]:+.2f}] |")
        lines.append(row)
    if fid:
        f0 = q["fp32_digit_fid"]
        lines += ["", (f"PyTorch FP32 digit-FID {f0['fid']:.2f} [{f0['ci'][0]:.2f}, {f0['ci'][1]:.2f}], at another "
                  f"seed {f0['fid_seed1']:.2f}: FP's own seed-to-seed spread {abs(f0['fid'] - f0['fid_seed1']):.2f}.")]
    return lines


def _ratio(lat: dict, best: str, other: str) -> float:
    return lat[other]["median_ms"] / lat[best]["median_ms"]


def _fidelity(res: dict, k: str) -> float:
    q = res["quality"]
    v = (q.get("variants", q))[k]
    return v.get("final_latent_snr_db", v.get("psnr_db", float("nan")))


def targets(tables: dict[str, dict | None]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met None: the table was not measured."""
    out: list[tuple[str, str, bool | None]] = []
    sd = tables.get("speed-peers-sd15")
    if sd is None:
        out.append(("SD-1.5 targets", "table missing", None))
    else:
        lat = sd["latency"]["1"]
        best = best_ours(lat)
        r_fp = _ratio(lat, best, "ort-fp32")
        fid_b = _fidelity(sd, best)
        for need, label in ((3.0, "first rung"), (3.5, "goal")):
            out.append((f"SD-1.5 batch 1: best engine >= {need}x ORT FP32 per call ({label})",
                        f"{best} {r_fp:.2f}x", r_fp >= need))
        for peer, need in (("ort-qstatic", 1.3), ("ov-nncf", 1.1)):
            r = _ratio(lat, best, peer)
            ok = r >= need and fid_b >= _fidelity(sd, peer)
            out.append((f"SD-1.5 batch 1: best engine >= {need}x {peer}, fidelity not worse",
                        f"{r:.2f}x; final-latent SNR {fid_b:.1f} vs {_fidelity(sd, peer):.1f} dB", ok))
        if sd.get("shared"):
            sh = sd["shared"]
            b2 = best_ours(sh)
            out.append(("SD-1.5 batch 1, CPU shared (report how the ratio holds)",
                        (f"{b2} {_ratio(sh, b2, 'ort-fp32'):.2f}x ORT FP32 (idle {r_fp:.2f}x), "
                        f"{_ratio(sh, b2, 'ort-qstatic'):.2f}x qstatic, {_ratio(sh, b2, 'ov-nncf'):.2f}x NNCF"), None))
    dg = tables.get("speed-peers")
    if dg is None or "8" not in dg["latency"]:
        out.append(("digits batch 8: best engine >= 2x ORT FP32", "table missing", None))
    else:
        lat = dg["latency"]["8"]
        best = best_ours(lat)
        r = _ratio(lat, best, "ort-fp32")
        out.append(("digits batch 8: best engine >= 2x ORT FP32", f"{best} {r:.2f}x", r >= 2.0))
    return out


def render(tables: dict[str, dict | None]) -> str:
    lines = ["# CPU speed against the peers a CPU user picks", "",
             ("Generated by `python benchmarks/peers_summary.py` from the peer benchmarks' JSON (each table's command, "
             "machine, versions and notes are in its own report, linked). Every table is one process: each round calls "
             "every variant once on the same feed, the order rotated; medians. Quality at the same seeds, so a "
             "faster-but-worse result cannot pass as a win. `ours-*` are our engines as `saq-deploy build-engine` "
             "builds them (W8A8 minmax artifacts); `-attn`: attention matmuls and softmax output at INT8 too."), "",
             "The per-op ONNX Runtime profile of our INT8 engine vs ORT FP32 is in `docs/results/speed-ort.md`.", ""]
    for title, name in SOURCES.items():
        res = tables.get(name)
        lines += [f"## {title}", ""]
        if res is None:
            lines += [f"Not measured: `docs/results/{name}.json` is missing.", ""]
            continue
        m = res["machine"]
        lines += [(f"Report: `docs/results/{name}.md`. Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; "
                  f"load average before {res['load_before']}, after {res['load_after']}."), ""]
        lines += _latency_table(res) + [""]
        if res.get("full_sample"):
            fs = res["full_sample"]
            lines += [f"Full 10-step DDIM CFG 1.5 sample at batch {res['full_sample_batch']} (s): "
                      + ", ".join(f"{k} {v['median_s']:.3f}" for k, v in fs.items()) + ".", ""]
        elif res.get("sample_s"):
            lines += ["Full 10-step DDIM CFG 7.5 sample at batch 1 (s): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in res["sample_s"].items()) + ".", ""]
        lines += _quality_table(res) + [""]
    lines += ["## Targets (issue 14)", "", "| target | measured | verdict |", "|---|---|---|"]
    for t, measured, ok in targets(tables):
        verdict = "reported" if ok is None else ("**met**" if ok else "**not met**")
        lines.append(f"| {t} | {measured} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notes", type=Path, default=None, help="hand-written findings appended below")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.md")
    args = ap.parse_args()
    from saq_deploy.utils.io import atomic_path

    tables = {name: _load(name) for name in SOURCES.values()}
    text = render(tables) + ("\n" + args.notes.read_text() if args.notes else "")
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
