"""``bench_engine``: per-call latency of an engine vs PyTorch FP32 and ONNX Runtime FP32 of the same
model, measured side by side (calls interleaved round-robin so machine noise hits all alike),
plus ``summary`` for the end of ``make demo``."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saq_deploy.errors import ConfigError

BENCH_FILE = "bench-{backend}.json"


def _feed(kind: str, shape, batch: int, cond_shape=None) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    cond = torch.arange(batch) % 10 if kind == "class" else None
    return x, t, cond


def bench_engine(artifact: str | Path, backend: str = "onnxruntime", engine: str | Path | None = None, *,
                 batch: int = 8, calls: int = 20, warmup: int = 3, force: bool = False,
                 others: tuple[str | Path, ...] = ()) -> dict:
    """``others``: more engine folders of the same calibration, timed in the same interleaved run."""
    from saq_deploy.backends.engine import EngineEpsModel, load_engine
    from saq_deploy.backends.onnxruntime import OrtRunner
    from saq_deploy.backends.registry import default_engine_dir
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.export.torch_export import export_unet_onnx
    from saq_deploy.models.eps_model import TorchEpsModel
    from saq_deploy.utils.io import write_json_atomic
    from saq_deploy.validate.run import check_force

    if batch < 1 or calls < 1:
        raise ConfigError("bench needs --batch >= 1 and --calls >= 1")
    check_force(force, backend)
    artifact = Path(artifact)
    q = load_artifact(artifact)
    eng = load_engine(Path(engine) if engine else default_engine_dir(artifact, backend), force=force)
    extra = {}
    for d in others:
        e = load_engine(d)
        if e.manifest["source"]["state_sha256"] != q.manifest["state_sha256"]:
            raise ConfigError(f"--with-engine '{d}' was built from a different calibration than '{artifact}'")
        extra[f"{e.backend}-engine ({Path(d).name})"] = e.eps_model()
    if q.loaded.kind == "text":
        raise ConfigError("bench covers class-conditional and unconditional models; see benchmarks/speed.py")
    models = {"pytorch-fp32": TorchEpsModel(q.fp_unet)}
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "fp32.onnx"
        export_unet_onnx(q.fp_unet, q.loaded.kind, q.loaded.sample_shape, fp)
        runner = OrtRunner(fp, opt_level="all", spinning=False)
        models["onnxruntime-fp32"] = EngineEpsModel(runner, q.loaded.kind, q.loaded.sample_shape)
        eng_key = f"{backend}-engine ({q.manifest['bits']})"
        models[eng_key] = eng.eps_model()
        models.update(extra)
        x, t, c = _feed(q.loaded.kind, q.loaded.sample_shape, batch)
        with torch.no_grad():
            for _ in range(warmup):
                for m in models.values():
                    m(x, t, c)
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(calls):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(x, t, c)
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {"batch": batch, "calls": calls, "median_ms": med,
              "speedup_vs_pytorch_fp32": med["pytorch-fp32"] / med[eng_key],
              "speedup_vs_onnxruntime_fp32": med["onnxruntime-fp32"] / med[eng_key],
              "threads": torch.get_num_threads()}
    write_json_atomic(artifact / BENCH_FILE.format(backend=backend), result)
    return result


def summary(artifact: str | Path, backend: str = "onnxruntime") -> str:
    """One table: parity gate, quality vs FP32, speed vs FP32 (from validate and bench outputs)."""
    artifact = Path(artifact)
    res_path = artifact / "validation" / backend / "result.json"
    if not res_path.exists():
        raise ConfigError(f"no validation result in '{res_path.parent}': run saq-deploy validate {artifact} first")
    r = json.loads(res_path.read_text())
    m = r["metrics"]
    rows = [("parity gate", "PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"])),
            ("engine vs fake-quant, mean / p10 SNR", f"{m['mean_snr_db']:.1f} / {m['p10_snr_db']:.1f} dB"),
            ("engine vs fake-quant, median cosine", f"{m['median_cosine']:.6f}"),
            ("final samples, engine vs fake-quant PSNR", f"{m['min_psnr_db']:.1f} dB (worst sampler)")]
    q = r.get("quality")
    if q:
        fp, en = q["fp32"], q["engine"]
        rows += [(f"digit-FID FP32 -> engine ({q['settings']['n']} samples)", f"{fp['digit_fid']:.2f} -> {en['digit_fid']:.2f}"),
                 ("accuracy FP32 -> engine", f"{fp['accuracy']:.3f} -> {en['accuracy']:.3f}"),
                 ("IS FP32 -> engine", f"{fp['inception_score']:.2f} -> {en['inception_score']:.2f}")]
    b_path = artifact / BENCH_FILE.format(backend=backend)
    if b_path.exists():
        b = json.loads(b_path.read_text())
        lat = ", ".join(f"{k} {v:.1f} ms" for k, v in b["median_ms"].items())
        rows += [(f"median latency per call, batch {b['batch']}", lat),
                 ("engine speed-up vs ONNX Runtime FP32", f"{b['speedup_vs_onnxruntime_fp32']:.2f}x"),
                 ("engine speed-up vs PyTorch FP32", f"{b['speedup_vs_pytorch_fp32']:.2f}x")]
    width = max(len(k) for k, _ in rows)
    head = f"== {artifact} ({r['method']}, {r['bits']}) on {backend}"
    return "\n".join([head] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [f"report: {res_path.parent / 'report.md'}"])
