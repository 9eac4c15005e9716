"""Parity-gate figures: engine vs fake-quant PyTorch for several calibrated artifacts, plus negative
controls (deliberately broken Q/DQ graphs) that show what the gate catches and what it does not.

    python benchmarks/parity.py runs/quality/w8a8-sa-ptq-s10-i300 runs/quality/w4a8-sa-ptq-s10-i300 ...

Writes docs/results/parity.{md,json}. Artifacts are built into ONNX Runtime engines if needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from saq_deploy.backends import build_engine
from saq_deploy.validate import validate_engine

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("median_cosine", "mean_snr_db", "p10_snr_db", "min_snr_db", "max_abs", "min_psnr_db")

# name -> (initializer filter, transform): bugs of the kind the gate is there to catch
CONTROLS = {
    "one conv's weight scales x1.3": (lambda n: n.startswith("down_blocks.1.resnets.0.conv1") and n.endswith("weight_scale"),
                                      lambda a: a * 1.3),
    "down_blocks.1 weight scales shifted by one channel": (lambda n: n.startswith("down_blocks.1.") and n.endswith("weight_scale"),
                                                           lambda a: np.roll(a, 1, axis=-1)),
    "down_blocks.1 weight scales x2 (divided by 63.5, not 127)": (lambda n: n.startswith("down_blocks.1.") and n.endswith("weight_scale"),
                                                                  lambda a: a * 2.0),
    "every activation step x2": (lambda n: n.endswith("_input_scale"), lambda a: a * 2.0),
}


def run(artifact: Path, n: int, engine: Path | None = None) -> dict:
    t0 = time.perf_counter()
    if engine is None:
        build_engine(artifact, "onnxruntime")
    r = validate_engine(artifact, "onnxruntime", engine, n=n, quality_n=0, log=lambda *_: None,
                        out_dir=Path(tempfile.mkdtemp()) if engine else None)
    return {"passed": r["passed"], "failures": r["failures"], "bits": r["bits"], "method": r["method"],
            "thresholds": r["thresholds"], **{k: r["metrics"][k] for k in KEYS}, "wall_s": round(time.perf_counter() - t0, 1)}


def control(artifact: Path, name: str, n: int) -> dict:
    pick, fn = CONTROLS[name]
    model = onnx.load(str(artifact / "onnx" / "onnxruntime-cpu" / "model.onnx"))
    for t in model.graph.initializer:
        if pick(t.name):
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)).astype(np.float32), t.name))
    tmp = Path(tempfile.mkdtemp())
    onnx.save(model, str(tmp / "bad.onnx"))
    eng = build_engine(artifact, "onnxruntime", tmp / "engine", onnx_file=tmp / "bad.onnx")
    return run(artifact, n, eng)


def render(data: dict, out: Path) -> str:
    """Markdown from the measured metrics; gate verdicts use the thresholds in force now."""
    from saq_deploy.backends.build import default_parity
    from saq_deploy.validate.parity import check_thresholds

    def verdict(r):
        return "pass" if not check_thresholds(r, default_parity(r["bits"])) else "FAIL"

    rows, ctrl, meta = data["artifacts"], data["controls"], data["meta"]
    lines = ["# Parity gate: ONNX Runtime engine vs the fake-quant PyTorch model", "",
             f"Command: `{meta['command']}`; {meta['cores']} CPU cores.", "",
             (f"Inputs: every UNet call of {meta['n']} seeded samples along the fake-quant model's own DDIM and "
             "DPM-Solver++(2M) 10-step trajectories (CFG 1.5, so 2x batch per call); final-sample PSNR from "
             "the same seeds. SNR and cosine are per call over the whole batch."), "",
             "| artifact | bits | gate | median cos | mean SNR | p10 SNR | worst-call SNR | max-abs | final PSNR |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = ("{median_cosine:.6f} | {mean_snr_db:.1f} | {p10_snr_db:.1f} | {min_snr_db:.1f} | {max_abs:.3f} | "
           "{min_psnr_db:.1f}")
    for a, r in rows.items():
        lines.append(f"| `{Path(a).name}` ({r['method']}) | {r['bits']} | {verdict(r)} | " + fmt.format(**r) + " |")
    lines += ["", (f"Negative controls on `{Path(meta['controls_on']).name}` (its ONNX Runtime graph deliberately "
              "broken, engine rebuilt from it, same gate):"), "",
              "| broken how | gate | median cos | mean SNR | p10 SNR | worst-call SNR | max-abs | final PSNR |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in ctrl.items():
        lines.append(f"| {name} | {verdict(r)} | " + fmt.format(**r) + " |")
    lines += ["", (f"Thresholds: 8-bit activations {json.dumps(default_parity('w8a8'))}; 4-bit activations "
              f"{json.dumps(default_parity('w4a4'))} (`saq_deploy/backends/build.py`). The gate catches "
              "whole-block scale errors and per-channel scale misordering; a single conv's scales off by 30% "
              "stay inside the rounding-flip noise and pass (the quality figures show it instead)."), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", type=Path)
    ap.add_argument("-n", type=int, default=16, help="seeded samples per sampler (DDIM + DPM-Solver++ 10 steps)")
    ap.add_argument("--controls-on", type=Path, help="artifact for the negative controls (default: the first)")
    ap.add_argument("--render-only", action="store_true", help="re-render the markdown from the saved JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "parity")
    args = ap.parse_args()
    if args.render_only:
        print(render(json.loads(args.out.with_suffix(".json").read_text()), args.out))
        return
    rows = {str(a): run(a, args.n) for a in args.artifacts}
    base = args.controls_on or args.artifacts[0]
    ctrl = {name: control(base, name, args.n) for name in CONTROLS}
    data = {"artifacts": rows, "controls": ctrl,
            "meta": {"command": f"python benchmarks/parity.py {' '.join(sys.argv[1:])}", "cores": os.cpu_count(),
                     "n": args.n, "controls_on": str(base)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(render(data, args.out))


if __name__ == "__main__":
    main()
