"""CPU peer speed table for a reference UNet (builtin:digits, or builtin:digits-text with --model
digits-text: prompt embeddings as cond), every variant in one process:

  torch-fp32      PyTorch eager FP32
  ort-fp32        ONNX Runtime FP32 (exported graph, ORT_ENABLE_ALL)
  ort-qstatic     ONNX Runtime quantize_static (QDQ, U8S8, per-channel), same calibration feeds
  ov-fp32         OpenVINO CPU plugin, FP32 ONNX, INFERENCE_PRECISION_HINT f32
  ov-nncf         NNCF nncf.quantize INT8 (preset PERFORMANCE = symmetric weights and activations,
                  NNCF's default for non-transformer models), same calibration feeds, OpenVINO CPU
  ours-ort        our ONNX Runtime engine (saq-deploy build-engine --backend onnxruntime)
  ours-ov         our OpenVINO engine (saq-deploy build-engine --backend openvino)

Every runtime gets --threads intra-op threads (torch.set_num_threads, ORT intra_op_num_threads,
OpenVINO INFERENCE_NUM_THREADS). Per-call latency: --rounds rounds, each calls every variant once
on the same feed, the variant order rotated each round; median, p10, p90. Quality: per-call SNR of
each variant's eps vs PyTorch FP32 on held-out recorded calls (DDIM-10 CFG 1.5 trajectories at a
seed the calibration feeds do not use), and paired PSNR of final DDIM-10 CFG 1.5 samples vs FP32.
The artifact needs its two engines (built here with the CLI if missing). NNCF is not a project
dependency: install it into the venv for this script only (pip install nncf -c constraints.txt).

    python benchmarks/peers.py --artifact runs/peers/w8a8 [--rounds 30] [--batches 1,8] [--psnr-n 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see speed.py: torch and ORT calls alternate

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import Model, calib_feeds, ort_quantize_static
from benchmarks.stats import fid_with_ci, paired_fid_delta
from saq_deploy.backends import load_engine
from saq_deploy.backends.onnxruntime import OrtRunner
from saq_deploy.utils.versions import cpu_model

QUANT = ("ort-qstatic", "ov-nncf", "ours-ort", "ours-ov")


def ensure_engines(art: Path, threads: int) -> dict[str, Path]:
    cli = str(Path(sys.executable).with_name("saq-deploy"))
    out = {"ours-ort": art / "engine", "ours-ov": art / "engine-openvino"}
    if not (art / "onnx" / "onnxruntime-cpu").is_dir():
        subprocess.run([cli, "export", str(art), "-t", "onnxruntime-cpu"], check=True)
    if not out["ours-ort"].is_dir():
        subprocess.run([cli, "build-engine", str(art), "--backend", "onnxruntime"], check=True)
    if not out["ours-ov"].is_dir():
        subprocess.run([cli, "build-engine", str(art), "--backend", "openvino", "--threads", str(threads)], check=True)
    return out


def build(m: Model, work: Path, feeds, art: Path, threads: int, preset: str) -> tuple[dict, dict]:
    import nncf
    import openvino as ov

    from saq_deploy.export.torch_export import export_unet_onnx

    notes: dict = {}
    fp_path, qs_path = work / "fp32.onnx", work / "qstatic.onnx"
    export_unet_onnx(m.unet, m.kind, m.shape, fp_path, cond_shape=m.cond_shape)
    np_feeds = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    t0 = time.perf_counter()
    ort_quantize_static(fp_path, qs_path, np_feeds)
    notes["qstatic_time_s"] = round(time.perf_counter() - t0, 1)

    core = ov.Core()
    ov_cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
    t0 = time.perf_counter()
    q_model = nncf.quantize(core.read_model(str(fp_path)), nncf.Dataset(np_feeds),
                            preset=getattr(nncf.QuantizationPreset, preset.upper()), subset_size=len(np_feeds))
    notes["nncf_time_s"] = round(time.perf_counter() - t0, 1)
    compiled = {"ov-fp32": core.compile_model(core.read_model(str(fp_path)), "CPU", ov_cfg),
                "ov-nncf": core.compile_model(q_model, "CPU", ov_cfg)}
    from saq_deploy.backends.openvino import runtime_precisions

    notes["nncf_compute_layers"] = runtime_precisions(compiled["ov-nncf"])["compute_layers"]

    kw = {"threads": threads, "opt_level": "all", "spinning": False}
    ort_fp, ort_qs = OrtRunner(fp_path, **kw), OrtRunner(qs_path, **kw)
    calls = {"torch-fp32": m.torch_call,
             "ort-fp32": lambda f: ort_fp.run(f, tuple(f["sample"].shape)),
             "ort-qstatic": lambda f: ort_qs.run(f, tuple(f["sample"].shape))}
    for name, c in compiled.items():
        req = c.create_infer_request()
        names = [i.get_any_name() for i in c.inputs]

        def ov_call(f, req=req, names=names):
            req.infer({n: f[n].numpy() for n in names})
            return torch.from_numpy(req.get_output_tensor(0).data.copy())

        calls[name] = ov_call
    for name, path in ensure_engines(art, threads).items():
        eng = load_engine(path, threads=threads)
        notes[f"{name}_engine"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        eps = eng.eps_model()
        calls[name] = (lambda f, eps=eps: eps(f["sample"], f["timestep"], f[m.cond_key]))
        calls[name].engine = eng
    return calls, notes


def per_call(calls: dict, feed: dict, rounds: int, warmup: int = 3) -> dict[str, dict]:
    names = list(calls)
    for _ in range(warmup):
        for f in calls.values():
            f(feed)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated each round
        for k in order:
            t0 = time.perf_counter()
            calls[k](feed)
            times[k].append((time.perf_counter() - t0) * 1000)
    out = {}
    for k, v in times.items():
        q = np.percentile(v, [10, 50, 90])
        out[k] = {"median_ms": statistics.median(v), "p10_ms": float(q[0]), "p90_ms": float(q[2])}
    return out


def snr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    err = float(((y.double() - ref.double()) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref.double() ** 2).sum()) / err)


def quality(calls: dict, m: Model, psnr_n: int, fid: bool, resamples: int = 100) -> dict:
    from saq_deploy.eval.metrics import psnr
    from saq_deploy.generate import SampleSettings, generate

    feeds = m.record(8, 10, seed=12345)
    refs = [calls["torch-fp32"](f) for f in feeds]
    out = {"held_out_calls": len(feeds), "held_out_batch": int(feeds[0]["sample"].shape[0]), "variants": {}}
    for k, f in calls.items():
        if k == "torch-fp32":
            continue
        s = [snr_db(r, f(x)) for r, x in zip(refs, feeds)]
        worst = int(np.argmin(s))
        out["variants"][k] = {"snr_median_db": statistics.median(s), "snr_min_db": min(s),
                              "snr_min_t": float(feeds[worst]["timestep"].reshape(-1)[0])}
    if psnr_n:
        # the same seeds for every variant: paired PSNR and a paired digit-FID difference vs FP32
        settings = SampleSettings(sampler="ddim", steps=10, cfg=1.5, seed=0, n=psnr_n, batch_size=min(psnr_n, 100))

        def sample(f):
            return generate(_eps_of(f, m), m.loaded.schedule(), m.shape, settings, **m.guidance(psnr_n))[0]

        ref = sample(calls["torch-fp32"])
        feats = digit_features(ref) if fid else None
        fname = _digit_feature_name()
        out["psnr_n"] = psnr_n
        if fid:
            value, lo, hi = fid_with_ci(feats, fname, resamples, 0)
            other = dataclasses.replace(settings, seed=1)  # FP's own seed-to-seed spread
            x1 = generate(_eps_of(calls["torch-fp32"], m), m.loaded.schedule(), m.shape, other, **m.guidance(psnr_n))[0]
            value1 = fid_with_ci(digit_features(x1), fname, 2, 0)[0]
            out["fp32_digit_fid"] = {"fid": value, "ci": [lo, hi], "fid_seed1": value1}
        for k, f in calls.items():
            if k != "torch-fp32":
                x = sample(f)
                out["variants"][k]["psnr_db"] = statistics.mean(psnr(ref[i].numpy(), x[i].numpy()) for i in range(psnr_n))
                if fid:
                    fq = digit_features(x)
                    value, lo, hi = fid_with_ci(fq, fname, resamples, 0)
                    d = paired_fid_delta(fq, feats, fname, resamples, 1)
                    out["variants"][k].update({"digit_fid": value, "digit_fid_ci": [lo, hi],
                                               "fid_minus_fp": d["delta"], "fid_minus_fp_ci": d["ci"]})
    return out


def _eps_of(f, m: Model):
    """A benchmark call (feed dict -> eps) as the sampler's eps(x, t, cond) contract."""
    def eps(x, t, cond):
        return f({"sample": x, "timestep": t.reshape(-1).expand(x.shape[0]).float(), m.cond_key: cond})
    return eps


@functools.cache
def _digit_extractor():
    """The digit feature CNN, loaded once for every variant's samples."""
    from saq_deploy.eval.features import DigitFeatures

    return DigitFeatures()


def _digit_feature_name() -> str:
    return _digit_extractor().name


def digit_features(images: torch.Tensor) -> np.ndarray:
    return np.asarray(_digit_extractor()(images), dtype=np.float64)


def full_sample(calls: dict, m: Model, batch: int, rounds: int) -> dict[str, dict]:
    """Wall time of a whole 10-step DDIM CFG 1.5 sample (batch ``batch``: 2x that per UNet call),
    every variant once per round, the order rotated."""
    from saq_deploy.generate import SampleSettings, generate

    settings = SampleSettings(sampler="ddim", steps=10, cfg=1.5, seed=0, n=batch, batch_size=batch)
    names, times = list(calls), {k: [] for k in calls}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            eps = _eps_of(calls[k], m)
            t0 = time.perf_counter()
            generate(eps, m.loaded.schedule(), m.shape, settings, **m.guidance(batch))
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in times.items()}


def render(res: dict) -> str:
    names = list(next(iter(res["latency"].values())))
    lines = [f"# CPU peer speed: reference UNet builtin:{res.get('model', 'digits')}", "",
             f"Command: `{res['command']}`", "",
             (f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['machine']['threads']} intra-op "
             f"threads for every runtime; load average before {res['load_before']}, after {res['load_after']}."), "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             (f"One process, {res['rounds']} rounds per batch, each round calls every variant once on the same "
             "feed with the variant order rotated each round; median per-call latency, p10/p90 in brackets."), ""]
    for b, lat in res["latency"].items():
        base = lat["ort-fp32"]["median_ms"]
        lines += [f"## batch {b}", "", "| variant | median ms | p10 / p90 ms | speed-up vs ORT FP32 |", "|---|---|---|---|"]
        for k in names:
            v = lat[k]
            lines.append(f"| {k} | {v['median_ms']:.2f} | {v['p10_ms']:.2f} / {v['p90_ms']:.2f} | "
                         f"{base / v['median_ms']:.2f}x |")
        best = min(("ours-ort", "ours-ov"), key=lambda k: lat[k]["median_ms"])
        lines += ["", (f"Our best ({best}): {lat['ort-qstatic']['median_ms'] / lat[best]['median_ms']:.2f}x vs "
                  f"quantize_static, {lat['ov-nncf']['median_ms'] / lat[best]['median_ms']:.2f}x vs NNCF "
                  "(> 1: ours faster)."), ""]
    if "full_sample" in res:
        fs, b = res["full_sample"], res["full_sample_batch"]
        lines += [f"## full 10-step DDIM sample, CFG 1.5, batch {b} (2x{b} per UNet call)", "",
                  f"{res['full_sample_rounds']} rounds, variant order rotated; wall seconds per sample call.", "",
                  "| variant | median s | min / max s | vs ORT FP32 |", "|---|---|---|---|"]
        for k in names:
            v = fs[k]
            lines.append(f"| {k} | {v['median_s']:.3f} | {v['min_s']:.3f} / {v['max_s']:.3f} | "
                         f"{fs['ort-fp32']['median_s'] / v['median_s']:.2f}x |")
        lines.append("")
    q = res["quality"]
    fid = "fp32_digit_fid" in q
    lines += ["## quality vs PyTorch FP32", "",
              f"Per-call SNR of eps on {q['held_out_calls']} held-out recorded calls (batch {q['held_out_batch']}: "
              "DDIM-10 CFG 1.5 trajectories, seed 12345, not the calibration feeds)"
              + (f"; paired PSNR (data range 2) of final DDIM-10 CFG 1.5 samples, {q['psnr_n']} samples at seed 0"
                 if "psnr_n" in q else "")
              + ("; digit-FID of those samples (95 % bootstrap interval) and its paired difference to PyTorch "
                 "FP32's samples at the same seeds." if fid else "."), ""]
    if fid:
        f0 = q["fp32_digit_fid"]
        lines += [(f"PyTorch FP32: digit-FID {f0['fid']:.2f} [{f0['ci'][0]:.2f}, {f0['ci'][1]:.2f}]; the same at "
                  f"seed 1: {f0['fid_seed1']:.2f} (FP's own seed-to-seed spread {abs(f0['fid'] - f0['fid_seed1']):.2f})."), ""]
    head = "| variant | SNR median dB | SNR min dB (at t) | sample PSNR dB |" + (
        " digit-FID | FID − FP32 (paired) |" if fid else "")
    lines += [head, "|---|---|---|---|" + ("---|---|" if fid else "")]
    for k, v in q["variants"].items():
        row = f"| {k} | {v['snr_median_db']:.1f} | {v['snr_min_db']:.1f} ({v['snr_min_t']:.0f}) | {v.get('psnr_db', float('nan')):.1f} |"
        if fid:
            row += (f" {v['digit_fid']:.2f} [{v['digit_fid_ci'][0]:.2f}, {v['digit_fid_ci'][1]:.2f}] |"
                    f" {v['fid_minus_fp']:+.2f} [{v['fid_minus_fp_ci'][0]:+.2f}, {v['fid_minus_fp_ci'][1]:+.2f}] |")
        lines.append(row)
    lines += ["", "## notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True, help="calibrated artifact of --model (engines built if missing)")
    ap.add_argument("--model", default="digits", choices=("digits", "digits-text"), help="the reference model")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", choices=("performance", "mixed"), default="performance", help="NNCF preset")
    ap.add_argument("--psnr-n", type=int, default=64, help="samples for the paired PSNR (0: skip)")
    ap.add_argument("--fid", action="store_true", help="also digit-FID of those samples, paired with FP32")
    ap.add_argument("--resamples", type=int, default=100, help="bootstrap resamples of the FID intervals")
    ap.add_argument("--sample-batch", type=int, default=8, help="batch of the timed full 10-step CFG sample")
    ap.add_argument("--sample-rounds", type=int, default=5, help="rounds of the timed full sample (0: skip)")
    ap.add_argument("--note", action="append", default=[], help="extra note for the report (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed-peers")
    args = ap.parse_args()
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: {e.name} is not installed: .venv/bin/pip install nncf openvino -c constraints.txt")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    m = Model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        feeds = calib_feeds(m, 10, 16)
        calls, notes = build(m, Path(tmp), feeds, args.artifact, args.threads, args.preset)
        latency = {}
        for b in [int(x) for x in args.batches.split(",")]:
            print(f"batch {b}: {args.rounds} rounds x {len(calls)} variants", flush=True)
            latency[str(b)] = per_call(calls, m.batch(b), args.rounds)
            print("   ", {k: round(v["median_ms"], 2) for k, v in latency[str(b)].items()}, flush=True)
        full = full_sample(calls, m, args.sample_batch, args.sample_rounds) if args.sample_rounds else None
        qual = quality(calls, m, args.psnr_n, args.fid, args.resamples)
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    res = {"model": args.model, "command": "python benchmarks/peers.py " + " ".join(argv) + (" --note ..." if args.note else ""),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads},
           "load_before": " ".join(load_before), "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
           "versions": {p: version(p) for p in ("torch", "onnxruntime", "openvino", "nncf")},
           "rounds": args.rounds,
           **({"full_sample": full, "full_sample_batch": args.sample_batch, "full_sample_rounds": args.sample_rounds}
              if full else {}),
           "nncf_preset": args.preset, "build": notes, "latency": latency, "quality": qual,
           "notes": [(f"NNCF preset {args.preset.upper()}, subset_size = all {len(feeds)} calibration batches "
                     f"(batch {int(feeds[0]['sample'].shape[0])}, real DDIM-10 CFG 1.5 FP trajectory inputs), "
                     f"target_device ANY; NNCF took {notes['nncf_time_s']} s, quantize_static {notes['qstatic_time_s']} s."),
                     f"NNCF model compute layers by runtime precision: {notes['nncf_compute_layers']}.",
                     (f"Our engines: {notes['ours-ort_engine']} and {notes['ours-ov_engine']} (W8A8 minmax artifact of the same model); "
                     "called through Engine.eps_model(), as users do, so their rows include its input checks."),
                     "ov-fp32 / ov-nncf are compiled in process from the same FP32 ONNX; CPU pinning off, like our OpenVINO engine.", *args.note]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
