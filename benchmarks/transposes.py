"""Where the NCHW <-> NHWC Transposes around integer convs come from, per Q/DQ placement, and
whether ONNX Runtime can drop them (issue 14, item 3).

ONNX Runtime's CPU QLinearConv kernel is NHWC: its NhwcTransformer (level ALL) rewrites each fused
QLinearConv to the NHWC contrib op with a Transpose on either side, and its transpose optimizer
then cancels the pairs it can push through layout-agnostic ops. What is left between two integer
convs is a Transpose pair the optimizer could not cancel. For each placement (our onnxruntime-cpu
graph, our tensorrt graph run by ORT) and with the NhwcTransformer on or off, this counts the
Transposes in ORT's optimized graph, which ops sit between them, their kernel time (ORT profiler),
and the per-call latency, all variants interleaved in one process. OpenVINO picks layouts inside
its plugin: its runtime model is checked for Transpose/Reorder layers the same way.

    python benchmarks/transposes.py [--models digits,sd15-tiny] [--batches 1,8] [--rounds 20]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import per_call
from benchmarks.speed import Model, calib_feeds, op_profile
from saq_deploy.utils.versions import cpu_model

PLACEMENTS = ("onnxruntime-cpu", "tensorrt")


def qdq_graphs(m: Model, work: Path, feeds) -> dict[str, Path]:
    """Both placements of one minmax W8A8 calibration (the pieces export uses)."""
    import copy

    import onnx

    from saq_deploy.export.api import build_target_model
    from saq_deploy.export.plan import build_plan
    from saq_deploy.export.torch_export import export_unet_onnx
    from saq_deploy.quant import quantize_
    from saq_deploy.quant.config import preset
    from saq_deploy.quant.observers import init_act_steps

    fp = work / "fp32.onnx"
    export_unet_onnx(m.unet, m.kind, m.shape, fp, cond_shape=m.cond_shape)
    fq = copy.deepcopy(m.unet)
    cfg = preset("w8a8")
    quantize_(fq, dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, scale_method="minmax")))
    m2 = copy.copy(m)
    m2.unet = fq
    init_act_steps(fq, lambda: [m2.torch_call(f) for f in feeds], "minmax")
    plan, np_feeds = build_plan(fq), [{k: v.numpy() for k, v in f.items()} for f in feeds]
    out = {}
    for target in PLACEMENTS:
        q, _ = build_target_model(onnx.load(str(fp)), plan, target, np_feeds)
        out[target] = work / f"{target}.onnx"
        onnx.save(q, str(out[target]))
    return out


def ort_layout(src: Path, dst: Path, disabled: tuple[str, ...]) -> dict:
    """Transposes left in ORT's optimized graph and what sits between a Transpose pair."""
    import onnx

    from saq_deploy.backends.onnxruntime import optimize_model

    optimize_model(src, dst, disabled_optimizers=disabled)
    g = onnx.load(str(dst)).graph
    ops = Counter(n.op_type for n in g.node)
    producer = {o: n for n in g.node for o in n.output}

    def nhwc(n) -> bool:
        return n is not None and n.op_type == "QLinearConv" and n.domain == "com.microsoft"

    # for every NHWC conv: walk its input back to the previous NHWC conv; the ops on the way, and
    # whether a Transpose pair is among them (the optimizer could not cancel it), name the reason
    between: Counter = Counter()
    for n in g.node:
        if not nhwc(n):
            continue
        path, p = [], producer.get(n.input[0])
        while p is not None and not nhwc(p) and len(path) < 14:
            path.append(p.op_type)
            p = producer.get(p.input[0]) if p.input else None
        if nhwc(p):
            between[" > ".join(["QLinearConv", *reversed(path), "QLinearConv"])] += 1
    return {"transposes": ops.get("Transpose", 0), "nhwc_convs": sum(1 for n in g.node if n.op_type == "QLinearConv" and n.domain == "com.microsoft"),
            "qlinear_convs": ops.get("QLinearConv", 0), "conv_integer": ops.get("ConvInteger", 0),
            "fp_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0), "conv_to_conv": dict(between.most_common(8))}


def openvino_layout(src: Path, threads: int) -> dict:
    import openvino as ov

    c = ov.Core().compile_model(ov.Core().read_model(str(src)), "CPU", {"INFERENCE_NUM_THREADS": threads})
    types = Counter(op.get_rt_info()["layerType"].astype(str) for op in c.get_runtime_model().get_ops())
    return {"transpose_layers": types.get("Transpose", 0), "reorder_layers": types.get("Reorder", 0),
            "convolution_layers": types.get("Convolution", 0)}, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,sd15-tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "transposes")
    args = ap.parse_args()
    from saq_deploy.backends.onnxruntime import OrtRunner
    from saq_deploy.export.api import ORT_DISABLED_OPTIMIZERS

    torch.set_num_threads(args.threads)
    res = {"command": "python benchmarks/transposes.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
           "threads": args.threads, "load_before": Path("/proc/loadavg").read_text().split()[:3], "models": {}}
    for name in args.models.split(","):
        m = Model(name)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            graphs = qdq_graphs(m, work, calib_feeds(m, 4, 8 if name == "digits" else 2))
            layout, calls, engines = {}, {}, {}
            for target, src in graphs.items():
                for nhwc in (True, False):
                    key = f"ort:{target}:{'nhwc' if nhwc else 'no-nhwc'}"
                    dis = ORT_DISABLED_OPTIMIZERS + (() if nhwc else ("NhwcTransformer",))
                    dst = work / f"{key.replace(':', '_')}.onnx"
                    layout[key] = ort_layout(src, dst, dis)
                    engines[key] = dst
                    r = OrtRunner(dst, threads=args.threads, opt_level="disable")
                    calls[key] = (lambda f, r=r: r.run(f, tuple(f["sample"].shape)))
                info, c = openvino_layout(src, args.threads)
                layout[f"openvino:{target}"] = info
                req, names = c.create_infer_request(), [i.get_any_name() for i in c.inputs]
                calls[f"openvino:{target}"] = (lambda f, req=req, names=names: req.infer({n: f[n].numpy() for n in names}))
            lat = {b: per_call(calls, m.batch(int(b)), args.rounds) for b in args.batches.split(",")}
            prof = {k: op_profile(p, m, int(args.batches.split(",")[-1]), args.threads) for k, p in engines.items()}
        res["models"][name] = {"layout": layout, "latency": lat,
                               "profile_batch": int(args.batches.split(",")[-1]),
                               "transpose_ms": {k: round(v.get("Transpose", 0.0), 3) for k, v in prof.items()},
                               "kernel_ms": {k: round(sum(v.values()), 3) for k, v in prof.items()}}
        print(json.dumps(res["models"][name], indent=1), flush=True)
    res["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))


def render(res: dict) -> str:
    out = ["# Layout transposes around integer convs, per placement", "", f"Command: `{res['command']}`", "",
           (f"Machine: {res['cpu']}, {res['threads']} threads; load average before {' '.join(res['load_before'])}, "
           f"after {' '.join(res['load_after'])}. Variants interleaved in one process (median ms per call)."), ""]
    for name, r in res["models"].items():
        bs = list(r["latency"])
        out += [f"## {name}", "", "| variant | Transposes | NHWC QLinearConv | QLinearConv | ConvInteger | FP Conv | "
                f"Transpose ms (b{r['profile_batch']}) | kernel ms (b{r['profile_batch']}) | " + " | ".join(f"b{b} ms" for b in bs) + " |",
                "|---|---|---|---|---|---|---|---|" + "---|" * len(bs)]
        for k, lay in r["layout"].items():
            lat = " | ".join(f"{r['latency'][b][k]['median_ms']:.2f}" for b in bs)
            if k.startswith("ort:"):
                out.append(f"| {k} | {lay['transposes']} | {lay['nhwc_convs']} | {lay['qlinear_convs']} | {lay['conv_integer']} | "
                           f"{lay['fp_convs']} | {r['transpose_ms'][k]:.2f} | {r['kernel_ms'][k]:.2f} | {lat} |")
            else:
                out.append(f"| {k} | {lay['transpose_layers']} (runtime; {lay['reorder_layers']} Reorder) | | | | "
                           f"{lay['convolution_layers']} (runtime) | | | {lat} |")
        out += ["", "Between consecutive NHWC integer convs in ORT's optimized graph (op path, count):", ""]
        for k, lay in r["layout"].items():
            if k.startswith("ort:") and lay["conv_to_conv"]:
                out.append(f"- {k}: " + "; ".join(f"`{p}` x{n}" for p, n in lay["conv_to_conv"].items()))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
