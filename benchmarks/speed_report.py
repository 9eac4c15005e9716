"""Render benchmarks/speed.py results to docs/results/speed-ort.{md,json} with the targets marked."""

from __future__ import annotations

import json
from pathlib import Path

VARIANTS = ("torch-fp32", "ort-fp32", "ort-int8", "ort-qstatic")
TARGET_SPEEDUP = 1.5
TARGET_SAMPLER_SHARE = 0.03


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def write_report(results: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    lines = ["# CPU speed: PyTorch FP32 vs ONNX Runtime FP32 vs our INT8 vs ORT quantize_static", "",
             f"Command: `{results['command']}`", "",
             (f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; onnxruntime "
             f"{results['versions'].get('onnxruntime')}, torch {results['versions'].get('torch')}."), "",
             ("All variants run side by side in one process, interleaved call by call (round-robin), so "
             "machine noise hits them alike: trust the ratios more than the absolute times."), ""]
    verdicts = []
    for name, r in results["models"].items():
        title = "reference digits UNet (1x16x16)" if name == "digits" else "SD-1.5-config UNet2DConditionModel, random weights, 4x32x32 latent, 77x768 text"
        lines += [f"## {title}", "", (f"{r['params_m']} M parameters; export + quantization + ORT builds "
                  f"{r['build_s']} s (quantize_static alone {r['qstatic_time_s']} s)."), "",
                  "Median latency per UNet call (ms):", "",
                  "| batch | " + " | ".join(VARIANTS) + " | INT8 vs ORT FP32 | INT8 vs quantize_static |",
                  "|---|" + "---|" * (len(VARIANTS) + 2)]
        for b, lat in r["latency_ms"].items():
            sp = lat["ort-fp32"] / lat["ort-int8"]
            vs = lat["ort-qstatic"] / lat["ort-int8"]
            lines.append(f"| {b} | " + " | ".join(f"{lat[v]:.1f}" for v in VARIANTS) + f" | {sp:.2f}x | {vs:.2f}x |")
            if name != "digits":
                verdicts.append((f"SD-1.5 batch {b}: INT8 >= {TARGET_SPEEDUP}x ORT FP32", sp >= TARGET_SPEEDUP, f"{sp:.2f}x"))
                verdicts.append((f"SD-1.5 batch {b}: INT8 faster than quantize_static", vs > 1.0, f"{vs:.2f}x"))
        lines += ["", ("Full 10-step DDIM sample with CFG 1.5 (batch "
                  f"{'8' if name == 'digits' else '1'}, so 2x that per UNet call):"), "",
                  "| variant | wall (s) | in UNet (s) | sampler share |", "|---|---|---|---|"]
        for v, s in r["sample"].items():
            lines.append(f"| {v} | {s['wall_s']:.2f} | {s['unet_s']:.2f} | {100 * s['sampler_share']:.2f}% |")
            verdicts.append((f"{name} {v}: sampler overhead <= 3%", s["sampler_share"] <= TARGET_SAMPLER_SHARE,
                             f"{100 * s['sampler_share']:.2f}%"))
        lines += ["", f"ONNX Runtime profile at batch {r['profile_batch']}: ms per call by op type (top 12):", "",
                  "| op (ort-fp32) | ms | op (ort-int8) | ms |", "|---|---|---|---|"]
        a, b = list(r["profile_ms"]["ort-fp32"].items())[:12], list(r["profile_ms"]["ort-int8"].items())[:12]
        for i in range(max(len(a), len(b))):
            left = f"{a[i][0]} | {a[i][1]:.2f}" if i < len(a) else " | "
            right = f"{b[i][0]} | {b[i][1]:.2f}" if i < len(b) else " | "
            lines.append(f"| {left} | {right} |")
        tot_f, tot_q = sum(r["profile_ms"]["ort-fp32"].values()), sum(r["profile_ms"]["ort-int8"].values())
        lines += ["", f"Kernel time per call: FP32 {tot_f:.1f} ms, INT8 {tot_q:.1f} ms.", ""]
        if r.get("int8_notes"):
            lines += ["INT8 graph notes: " + "; ".join(r["int8_notes"]), ""]
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {what} | {val} | {_mark(ok)} |" for what, ok, val in verdicts]
    lines += ["", "Notes:", "",
              ("- Our INT8 and ORT's `quantize_static` fuse the same kernels (QLinearConv, "
              "MatMulIntegerToFloat); the margin between them is a few percent, about the size of run-to-run "
              "noise, so read 'faster than quantize_static' as 'on par or slightly faster'. Ours keeps the "
              "calibrated (SA-PTQ) scales and passes the parity gate; quantize_static re-calibrates with its own."),
              ("- Where the INT8 time goes: QLinearConv and MatMulIntegerToFloat replace FP32 Conv/MatMul at ~4x "
              "lower cost; what is left is FP32 attention (activation x activation MatMul, Softmax), the "
              "NCHW<->NHWC Transposes around QLinearConv, and Q/DQ at the edges of the fused regions. "
              "Quantizing the attention matmuls and keeping NHWC between consecutive convs would close more."),
              ("- SD-1.5 batch 32 is not measured: one batch-8 call of this 860 M-parameter UNet takes ~15 s on "
              "2 cores, so 20 calls x 4 variants at batch 32 did not fit the session."), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out.with_suffix('.md')}")
