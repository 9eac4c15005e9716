"""GPU speed: TensorRT FP16 engine vs TensorRT INT8 (Q/DQ) engine vs PyTorch FP16 eager and
torch.compile, in one run: per-call UNet latency (CUDA events) and full-sample time (DDIM + CFG).

Usage (inside an NGC TensorRT container or with NVIDIA's index, on a CUDA GPU):
    python benchmarks/speed_tensorrt.py --artifact runs/x --profile engines/profiles/digits.toml \
        [--batch 16] [--steps 20] [--iters 50] [--out docs/results/speed-tensorrt]
    python benchmarks/speed_tensorrt.py --artifact runs/x --torch-only [--sd15]   # CUDA, no TensorRT:
        PyTorch FP16/BF16 eager + compiled and the fake-quant overhead (the baseline an engine must beat)

The INT8 engine is built from the artifact's tensorrt-target Q/DQ ONNX (saq-deploy build-engine);
the FP16 engine from the FP UNet exported to ONNX and converted to FP16 types, with the same
profile. Engine calls see batch 2*B (CFG's [uncond; cond]). Ratios are printed against PyTorch
FP16 eager. Exits with a message (code 2) when CUDA or TensorRT is missing. Separate from the CPU
benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _exit(msg: str) -> None:
    print(f"speed_tensorrt.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _check(torch_only: bool) -> None:
    if not torch.cuda.is_available():
        _exit("needs a CUDA GPU (torch.cuda.is_available() is False); for CPU figures use benchmarks/speed.py")
    if torch_only:
        return
    from saq_deploy.backends.tensorrt import require_builder
    from saq_deploy.errors import BackendUnavailableError

    try:
        require_builder()
    except BackendUnavailableError as e:
        _exit(f"{e} (or pass --torch-only for the PyTorch GPU baseline)")


def call_latency(eps, x, t, c, iters: int, warmup: int = 10) -> dict:
    """Median / p90 ms per UNet call, timed with CUDA events."""
    for _ in range(warmup):
        eps(x, t, c)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        eps(x, t, c)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def sample_time(eps, loaded, batch: int, steps: int, reps: int = 3) -> float:
    """Median seconds for one full DDIM sample of ``batch`` images with CFG 1.5, all on the GPU."""
    from saq_deploy.generate import SampleSettings, generate, initial_noise

    settings = SampleSettings(sampler="ddim", steps=steps, cfg=1.5, seed=0, n=batch, batch_size=batch)
    x_T = initial_noise(loaded.sample_shape, batch, 0).cuda()
    labels = (torch.arange(batch) % (loaded.num_classes or 1)).cuda() if loaded.num_classes else None
    sched = loaded.schedule()
    out = []
    for _ in range(reps + 1):  # the first run warms up (and compiles)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(eps, sched, loaded.sample_shape, settings, null_label=loaded.null_label, cond=labels, x_T=x_T)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return round(statistics.median(out[1:]), 4)


def torch_variants(fq, dtypes: tuple[torch.dtype, ...], fake_quant: bool) -> dict:
    from saq_deploy.models.eps_model import TorchEpsModel

    out = {}
    for dt in dtypes:
        name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dt]
        unet = copy.deepcopy(fq.fp_unet).to("cuda", dt).eval()
        out[f"PyTorch {name} eager"] = TorchEpsModel(unet)
        out[f"PyTorch {name} torch.compile"] = TorchEpsModel(torch.compile(unet))
    if fake_quant:  # the calibrated fake-quant model itself, on the GPU
        from saq_deploy.calibrate.artifact import FakeQuantEpsModel

        unet = copy.deepcopy(fq.loaded.unet).cuda().eval()
        from saq_deploy.quant.timestep import TimestepGroups

        qc = fq.manifest["quant_config"]
        out["PyTorch fake-quant fp32 eager"] = FakeQuantEpsModel(unet, TimestepGroups.from_quant_config(qc),
                                                                 int(qc.get("num_train_timesteps", 1000)))
    return out


def fp16_engine(fq, prof, work: Path):
    """TensorRT engine of the FP (unquantized) UNet, FP16-typed, same profile."""
    import onnx
    import tensorrt as trt

    from saq_deploy.backends.tensorrt_build import build_plan
    from saq_deploy.backends.tensorrt_runtime import TrtRunner
    from saq_deploy.backends.trt_profile import resolve_shapes
    from saq_deploy.export.api import to_fp16
    from saq_deploy.export.torch_export import export_unet_onnx

    loaded = fq.loaded
    fp32 = work / "fp32.onnx"
    specs = export_unet_onnx(fq.fp_unet, loaded.kind, loaded.sample_shape, fp32)
    onnx.save(to_fp16(onnx.load(str(fp32))), str(work / "fp16.onnx"))
    shapes = resolve_shapes(prof, specs, {"sample_shape": list(loaded.sample_shape)})
    plan, stats = build_plan(trt, work / "fp16.onnx", prof, shapes)
    (work / "fp16.plan").write_bytes(plan)
    return TrtRunner(work / "fp16.plan", trt, cuda_graph=prof.cuda_graph), stats


def engine_variants(args, fq, work: Path) -> dict:
    from saq_deploy.backends.build import build_engine
    from saq_deploy.backends.engine import EngineEpsModel, load_engine
    from saq_deploy.backends.trt_profile import load_profile

    prof = load_profile(args.profile)
    int8_dir = build_engine(args.artifact, "tensorrt", work / "int8", profile=args.profile)
    runner, _ = fp16_engine(fq, prof, work)
    loaded = fq.loaded
    fp16 = EngineEpsModel(runner, loaded.kind, loaded.sample_shape, prof.batches[2])
    return {"TensorRT FP16 engine": fp16, "TensorRT INT8 engine (Q/DQ)": load_engine(int8_dir).eps_model()}


def sd15_rows(iters: int, batch: int) -> list[dict]:
    """Per-call latency of an SD-1.5-config UNet (random weights) in FP16/BF16, eager and compiled."""
    from diffusers import UNet2DConditionModel

    from saq_deploy.models.eps_model import TorchEpsModel

    rows = []
    for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to("cuda", dt).eval()
        x = torch.randn(2 * batch, 4, 64, 64, device="cuda")
        t = torch.full((2 * batch,), 500.0, device="cuda")
        c = torch.randn(2 * batch, 77, 768, device="cuda", dtype=dt)
        for mode, m in (("eager", unet), ("torch.compile", torch.compile(unet))):
            rows.append({"model": "SD-1.5 config UNet", "variant": f"PyTorch {name} {mode}",
                         "call_batch": 2 * batch, **call_latency(TorchEpsModel(m), x, t, c, iters)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="calibrated artifact (saq-deploy calibrate)")
    ap.add_argument("--profile", type=Path, default=ROOT / "engines/profiles/digits.toml")
    ap.add_argument("--batch", type=int, default=16, help="images per sample (engine call batch: 2x)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--torch-only", action="store_true", help="no TensorRT: PyTorch GPU baseline only")
    ap.add_argument("--sd15", action="store_true", help="also time an SD-1.5-config UNet (PyTorch)")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    _check(args.torch_only)

    from saq_deploy.calibrate.artifact import load_artifact

    fq = load_artifact(args.artifact)
    loaded = fq.loaded
    variants = torch_variants(fq, (torch.float16, torch.bfloat16) if args.torch_only else (torch.float16,),
                              fake_quant=args.torch_only)
    with tempfile.TemporaryDirectory(prefix="saq-speed-trt-") as tmp:
        if not args.torch_only:
            variants.update(engine_variants(args, fq, Path(tmp)))
        b = args.batch
        x = torch.randn(2 * b, *loaded.sample_shape, device="cuda")
        t = torch.linspace(10, 990, 2 * b, device="cuda")
        c = (torch.arange(2 * b, device="cuda") % (loaded.num_classes or 1)) if loaded.num_classes else None
        rows = []
        for name, eps in variants.items():
            row = {"model": loaded.name, "variant": name, "call_batch": 2 * b, **call_latency(eps, x, t, c, args.iters),
                   "sample_s": sample_time(eps, loaded, b, args.steps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["variant"] == "PyTorch fp16 eager")
    for r in rows:
        r["call_speedup_vs_fp16_eager"] = round(base["median_ms"] / r["median_ms"], 2)
        r["sample_speedup_vs_fp16_eager"] = round(base["sample_s"] / r["sample_s"], 2)
    if args.sd15:
        rows += sd15_rows(args.iters, min(b, 4))
    _report(args, rows)


def _report(args, rows: list[dict]) -> None:
    from saq_deploy.utils.io import write_json_atomic
    from saq_deploy.utils.versions import package_versions

    gpu = torch.cuda.get_device_name()
    meta = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]), "gpu": gpu,
            "cuda": torch.version.cuda, "machine": platform.machine(), "versions": package_versions(),
            "batch": args.batch, "steps": args.steps, "iters": args.iters}
    head = "| model | variant | call batch | call median ms | p90 ms | sample s | call x | sample x |"
    lines = [f"# GPU speed on {gpu} (DDIM {args.steps} steps, CFG 1.5, {args.batch} images per sample)", "",
             f"Command: `{meta['command']}`  ", f"CUDA {meta['cuda']}; x = speed-up vs PyTorch FP16 eager.", "",
             head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['call_batch']} | {r['median_ms']} | {r['p90_ms']} | "
                     f"{r.get('sample_s', '-')} | {r.get('call_speedup_vs_fp16_eager', '-')} | "
                     f"{r.get('sample_speedup_vs_fp16_eager', '-')} |")
    print("\n".join(lines[4:]))
    if args.out:
        write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
