"""CPU peer speed table for the SD-1.5-config UNet (random weights, 4x32x32 latent, 77x768 text),
every variant in one process, interleaved (the digits table is benchmarks/peers.py):

  torch-fp32, ort-fp32, ort-qstatic, ov-fp32, ov-nncf    as in peers.py, same calibration feeds
  ours-ort        our onnxruntime-cpu Q/DQ placement, built and loaded as build-engine does
  ours-ort-attn   the same with attention q.k^T / probs.v and the softmax output at INT8 (full INT8)
  ours-ov         our tensorrt placement compiled by the OpenVINO CPU plugin (build-engine --backend openvino)
  ours-ov-attn    the same, full INT8 attention
  ours-ov-ortpl[-attn]  (--ov-ort-placement) the onnxruntime-cpu placements compiled by OpenVINO

An SD-1.5-size artifact through `saq-deploy calibrate` + `export` costs ~40 min and 15 GB on 2 cores
(docs/results/sd15-prompt-path.md), so "ours" is built in process from the same pieces the CLI
uses: `quantize_` (W8A8, minmax weight scales), `init_act_steps` (minmax) on the calibration feeds,
`build_plan` and `build_target_model`, then the backends' own `optimize_model` / `compile_blob` and
runners. Build happens in a child process (`--build-only`) so its ~15 GB peak is returned before the
runtimes load. Latency: --rounds rounds per batch, variant order rotated each round; then, with
--load-procs busy processes (one numpy matmul loop each) sharing the cores, --load-rounds more
rounds at batch 1: how each ratio holds when the CPU is shared. Quality: per-call SNR vs PyTorch
FP32 on held-out random calls and the SNR of the final latent of a 10-step DDIM CFG 7.5 sample
(batch 1, so 2 per UNet call), which is also timed.

    python benchmarks/peers_sd15.py --work runs/peers-sd15 [--rounds 10] [--batches 1,2] [--load-procs 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see speed.py: torch and ORT calls alternate

import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import per_call, snr_db
from benchmarks.speed import Model, calib_feeds, ort_quantize_static
from saq_deploy.utils.versions import cpu_model

OURS = {"ours-ort": ("onnxruntime-cpu", False), "ours-ort-attn": ("onnxruntime-cpu", True),
        "ours-ov": ("tensorrt", False), "ours-ov-attn": ("tensorrt", True)}


STAGES = ("export", "qstatic", "nncf", "ours")


def build_stage(stage: str, work: Path, threads: int, model: str) -> None:
    """One build stage, in its own process (an SD-1.5 UNet's stages peak at 10-15 GB each, and a
    process does not hand freed memory back reliably): writes its graphs and build-<stage>.json."""
    torch.set_num_threads(threads)
    fp, notes, t0 = work / "fp32" / "model.onnx", {}, time.perf_counter()
    if stage == "export":
        from saq_deploy.export.torch_export import export_unet_onnx

        m = Model(model)
        fp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(calib_feeds(m, 2, 2), work / "feeds.pt")  # one set of calibration inputs for every quantizer
        export_unet_onnx(m.unet, m.kind, m.shape, fp, cond_shape=m.cond_shape)
    np_feeds = [{k: v.numpy() for k, v in f.items()} for f in torch.load(work / "feeds.pt", weights_only=True)]
    if stage == "qstatic":
        ort_quantize_static(fp, work / "qstatic.onnx", np_feeds, external_data=True)
    elif stage == "nncf":
        import nncf
        import openvino as ov

        q = nncf.quantize(ov.Core().read_model(str(fp)), nncf.Dataset(np_feeds),
                          preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(np_feeds))
        ov.save_model(q, str(work / "nncf.xml"), compress_to_fp16=False)
    elif stage == "ours":
        notes = build_ours(work, model, np_feeds)
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    (work / f"build-{stage}.json").write_text(json.dumps(notes, indent=2))


def build_ours(work: Path, model: str, np_feeds: list[dict]) -> dict:
    """Our four Q/DQ graphs from one minmax W8A8 calibration (with attention quantizers)."""
    import onnx

    from saq_deploy.export.api import build_target_model
    from saq_deploy.export.plan import ExportPlan, build_plan
    from saq_deploy.quant import quantize_
    from saq_deploy.quant.config import preset
    from saq_deploy.quant.observers import init_act_steps

    m = Model(model)
    feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in np_feeds]
    cfg = preset("w8a8")  # minmax weight scales: the MSE search costs minutes on 860 M weights, speed is the same
    cfg = dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, scale_method="minmax"), attention_matmul=True)
    quantize_(m.unet, cfg)
    init_act_steps(m.unet, lambda: [m.torch_call(f) for f in feeds], "minmax")
    plan = build_plan(m.unet)
    m = None
    gc.collect()
    fp_model, notes = onnx.load(str(work / "fp32" / "model.onnx")), {}
    for name, (target, attn) in OURS.items():
        t0 = time.perf_counter()
        qm, rep = build_target_model(fp_model, ExportPlan(plan, plan.attention if attn else None), target, np_feeds)
        onnx.save(qm, str(work / f"{name}.onnx"))
        notes[name] = {"target": target, "attention_int8": attn, "qdq_s": round(time.perf_counter() - t0, 1),
                       "attention_matmuls": len(rep.attention), "not_represented": rep.not_represented}
        del qm
        gc.collect()
    return notes


def engines(work: Path, threads: int, ov_on_ort_placement: bool = False) -> dict:
    """Our four engines, built and opened with the backends' own code (what build-engine does)."""
    from saq_deploy.backends.int8_codes import drop_source, source_for_this_cpu
    from saq_deploy.backends.onnxruntime import OrtRunner, optimize_model
    from saq_deploy.backends.openvino import OvRunner, compile_blob
    from saq_deploy.export.api import ORT_DISABLED_OPTIMIZERS

    out, notes = {}, {}
    for name, (target, _) in OURS.items():
        # as build-engine: on x86 without VNNI the same codes go in as UINT8 zp 128 (deployment.md §8)
        onnx_path = work / f"{name}.onnx"
        src, codes = source_for_this_cpu(onnx_path, work)
        if target == "onnxruntime-cpu":
            b = optimize_model(src, work / f"{name}.engine.onnx", disabled_optimizers=ORT_DISABLED_OPTIMIZERS,
                               shown=onnx_path)
            out[name] = OrtRunner(work / f"{name}.engine.onnx", threads=threads, opt_level="disable")
            notes[name] = {"build_s": b["build_time_s"], **codes}
        else:
            d = work / f"{name}.ov"
            d.mkdir(exist_ok=True)
            _, b, f = compile_blob(src, d, target, threads=threads, shown=onnx_path)
            out[name] = OvRunner(d / f, b, threads=threads)
            notes[name] = {"build_s": b["build_time_s"], "compute_layers": b["precisions"]["compute_layers"], **codes}
        if target == "onnxruntime-cpu" and ov_on_ort_placement:
            # the same graph through OpenVINO: which placement OpenVINO runs faster at this size
            d = work / f"{name}.ov-ortpl"
            d.mkdir(exist_ok=True)
            _, b, f = compile_blob(src, d, target, threads=threads, shown=onnx_path)
            ov_name = name.replace("ours-ort", "ours-ov-ortpl")
            out[ov_name] = OvRunner(d / f, b, threads=threads)
            notes[ov_name] = {"build_s": b["build_time_s"], "compute_layers": b["precisions"]["compute_layers"], **codes}
        del src
        drop_source(work)
        gc.collect()
    return out, notes


def calls_for(work: Path, m: Model, threads: int, ov_on_ort_placement: bool = False) -> tuple[dict, dict]:
    import openvino as ov

    from saq_deploy.backends.onnxruntime import OrtRunner
    from saq_deploy.backends.openvino import runtime_precisions

    kw = {"threads": threads, "opt_level": "all", "spinning": False}
    ort_fp, ort_qs = OrtRunner(work / "fp32" / "model.onnx", **kw), OrtRunner(work / "qstatic.onnx", **kw)
    calls = {"torch-fp32": m.torch_call,
             "ort-fp32": lambda f: ort_fp.run(f, tuple(f["sample"].shape)),
             "ort-qstatic": lambda f: ort_qs.run(f, tuple(f["sample"].shape))}
    core = ov.Core()
    ov_cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
    notes = {}
    for name, src in (("ov-fp32", work / "fp32" / "model.onnx"), ("ov-nncf", work / "nncf.xml")):
        c = core.compile_model(core.read_model(str(src)), "CPU", ov_cfg)
        if name == "ov-nncf":
            notes["nncf_compute_layers"] = runtime_precisions(c)["compute_layers"]
        req, names = c.create_infer_request(), [i.get_any_name() for i in c.inputs]

        def ov_call(f, req=req, names=names):
            req.infer({n: f[n].numpy() for n in names})
            return torch.from_numpy(req.get_output_tensor(0).data.copy())

        calls[name] = ov_call
        gc.collect()
    ours, notes["ours"] = engines(work, threads, ov_on_ort_placement)
    for name, r in ours.items():
        calls[name] = (lambda f, r=r: r.run(f, tuple(f["sample"].shape)))
    return calls, notes


def _busy(stop) -> None:  # one core's worth of load, as another tenant would add
    os.environ["OMP_NUM_THREADS"] = "1"
    a = np.random.default_rng(0).standard_normal((512, 512))
    while not stop.is_set():
        a = np.tanh(a @ a.T * 1e-3)


def sample(f, m: Model, steps: int = 10, cfg: float = 7.5) -> tuple[torch.Tensor, float]:
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.schedules.vp import VPSchedule

    schedule = VPSchedule.from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                          "beta_end": 0.012, "num_train_timesteps": 1000})
    g = torch.Generator().manual_seed(1)
    cond, null = torch.randn(1, *m.cond_shape, generator=g), torch.zeros(1, *m.cond_shape)

    def eps(x, t, c):
        return f({"sample": x, "timestep": t.reshape(-1).expand(x.shape[0]).float(), "encoder_hidden_states": c})

    t0 = time.perf_counter()
    x, _ = generate(eps, schedule, m.shape, SampleSettings(sampler="ddim", steps=steps, cfg=cfg, seed=0, n=1, batch_size=1),
                    num_classes=None, null_label=null, cond=cond)
    return x, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "peers-sd15")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--load-procs", type=int, default=2, help="busy processes for the shared-CPU pass (0: skip)")
    ap.add_argument("--load-rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="sd15", choices=("sd15", "sd15-tiny"), help="sd15-tiny: a smoke run")
    ap.add_argument("--build-stage", choices=STAGES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ov-ort-placement", action="store_true",
                    help="also our onnxruntime-cpu placements compiled by OpenVINO (ours-ov-ortpl*)")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed-peers-sd15")
    args = ap.parse_args()
    if args.build_stage:
        return build_stage(args.build_stage, args.work, args.threads, args.model)
    build = {}
    for stage in STAGES:  # each in a child process; a finished stage is kept (its JSON is written last)
        if not (args.work / f"build-{stage}.json").is_file():
            print(f"build: {stage}", flush=True)
            subprocess.run([sys.executable, __file__, "--build-stage", stage, "--work", str(args.work), "--threads",
                            str(args.threads), "--model", args.model], check=True)
        build[stage] = json.loads((args.work / f"build-{stage}.json").read_text())
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    m = Model(args.model)
    calls, notes = calls_for(args.work, m, args.threads, args.ov_ort_placement)
    notes["build"] = build
    latency = {}
    for b in [int(x) for x in args.batches.split(",")]:
        print(f"batch {b}: {args.rounds} rounds x {len(calls)} variants", flush=True)
        latency[str(b)] = per_call(calls, m.batch(b), args.rounds, warmup=1)
        print("   ", {k: round(v["median_ms"], 1) for k, v in latency[str(b)].items()}, flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    shared = None
    if args.load_procs:
        stop = mp.Event()
        procs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load_procs)]
        for p in procs:
            p.start()
        print(f"shared CPU: {args.load_procs} busy processes, batch 1, {args.load_rounds} rounds", flush=True)
        shared = per_call(calls, m.batch(1), args.load_rounds, warmup=1)
        stop.set()
        for p in procs:
            p.join()
        print("   ", {k: round(v["median_ms"], 1) for k, v in shared.items()}, flush=True)
    held = [m.batch(1, seed=9000 + i) for i in range(4)]
    refs = [calls["torch-fp32"](f) for f in held]
    ref_x, _ = sample(calls["torch-fp32"], m)
    quality, samples = {}, {}
    for k, f in calls.items():
        x, wall = sample(f, m)
        samples[k] = wall
        if k != "torch-fp32":
            s = [snr_db(r, f(h)) for r, h in zip(refs, held)]
            quality[k] = {"snr_median_db": statistics.median(s), "snr_min_db": min(s), "final_latent_snr_db": snr_db(ref_x, x)}
        print(k, f"sample {wall:.1f} s", quality.get(k), flush=True)
    res = {"command": "python benchmarks/peers_sd15.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--note")),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads},
           "load_before": " ".join(load_before), "load_after": " ".join(load_after),
           "versions": {p: version(p) for p in ("torch", "onnxruntime", "openvino", "nncf")},
           "rounds": args.rounds, "load_procs": args.load_procs, "load_rounds": args.load_rounds,
           "latency": latency, "shared": shared, "sample_s": samples, "quality": quality, "build": notes,
           "notes": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    from benchmarks.peers_sd15_report import render

    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
