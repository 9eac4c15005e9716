"""CPU speed, all variants side by side in one run on one machine:

  torch-fp32        PyTorch eager FP32
  ort-fp32          ONNX Runtime FP32 (same exported graph, ORT_ENABLE_ALL)
  ort-int8 (ours)   our onnxruntime-cpu Q/DQ placement (QLinearConv / MatMulIntegerToFloat)
  ort-qstatic       ONNX Runtime's own quantize_static (QDQ, U8S8, per-channel) of the same graph

Per-call latency: median of --calls timed calls after warm-up, variants interleaved round-robin so
machine noise hits all alike; full DDIM sample wall time with CFG and the sampler's share of it;
an ONNX Runtime per-op-type profile of ort-fp32 vs ort-int8. Models: the reference digits UNet
and an SD-1.5-config UNet2DConditionModel with random weights at a 32x32 latent.

    python benchmarks/speed.py                       # both models (SD-1.5: --sd-batches)
    python benchmarks/speed.py --models digits --calls 30
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: torch and ONNX Runtime calls alternate in this
# process, and spinning torch threads would steal the cores from the next ORT call (and thrash
# when anything else runs: 2.7 s instead of 36 ms per digits call measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saq_deploy.backends.onnxruntime import OrtRunner
from saq_deploy.export.api import build_target_model
from saq_deploy.export.plan import build_plan
from saq_deploy.export.torch_export import export_unet_onnx
from saq_deploy.quant import quantize_
from saq_deploy.quant.config import preset
from saq_deploy.quant.observers import init_act_steps
from saq_deploy.utils.versions import cpu_model

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("torch-fp32", "ort-fp32", "ort-int8", "ort-qstatic")


class Model:
    """FP UNet + the inputs it takes (name, kind, shapes, a batch maker). ``digits`` and
    ``digits-text`` are the trained reference models (real trajectories: ``record``); ``sd15`` is the
    SD-1.5 UNet config with random weights (``sd15-tiny``: the same blocks, narrow, for smoke runs)."""

    def __init__(self, name: str):
        self.name, self.table = name, None
        if name in ("digits", "digits-text"):
            from saq_deploy.models.loading import load_model

            self.loaded = load_model(f"builtin:{name}")
            self.unet, self.shape = self.loaded.unet, tuple(self.loaded.sample_shape)
            self.kind, self.cond_shape = ("class", None) if name == "digits" else ("text", None)
            if name == "digits-text":  # the evaluation prompts' embeddings, the negative prompt's last
                from saq_deploy.models.text_encoder import TextEncoder, pipeline_root
                from saq_deploy.reference.text_data import eval_prompts

                self.table = TextEncoder(pipeline_root(f"builtin:{name}")).table(eval_prompts(20)[0], "", warn=False)
                self.cond_shape = tuple(self.table.shape[1:])
        else:
            from diffusers import UNet2DConditionModel

            torch.manual_seed(0)  # SD-1.5 UNet config (diffusers defaults = SD-1.x), random weights
            small = {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1} if name == "sd15-tiny" else {}
            self.unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768, attention_head_dim=8, **small).eval()
            self.loaded, self.kind, self.shape, self.cond_shape = None, "text", (4, 32, 32), (77, 768)

    @property
    def cond_key(self) -> str:
        return "class_labels" if self.kind == "class" else "encoder_hidden_states"

    def guidance(self, n: int) -> dict:
        """generate()'s conditioning keywords for n samples of a reference model (prompts cycling)."""
        if self.table is None:
            return {"num_classes": self.loaded.num_classes, "null_label": self.loaded.null_label}
        p = self.table.shape[0] - 1
        return {"cond": self.table[torch.arange(n) % p], "null_label": self.table[p:]}

    def record(self, n: int, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """Every UNet call (CFG-batched) of a seeded FP DDIM CFG 1.5 sample of n: real inputs."""
        from saq_deploy.export.feeds import record_calls

        g = self.guidance(n)
        calls = record_calls(self.loaded.eps_model(), self.loaded, samplers=("ddim",), steps=steps, n=n, seed=seed,
                             cond=g.get("cond"), null_cond=g["null_label"] if self.table is not None else None)
        return [{"sample": c.x, "timestep": c.t, self.cond_key: c.cond} for c in calls]

    def batch(self, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        feed = {"sample": torch.randn(b, *self.shape, generator=g),
                "timestep": torch.randint(0, 1000, (b,), generator=g).float()}
        if self.kind == "class":
            feed["class_labels"] = torch.arange(b) % 11
        elif self.table is not None:
            feed["encoder_hidden_states"] = self.table[torch.arange(b) % self.table.shape[0]]
        else:
            feed["encoder_hidden_states"] = torch.randn(b, *self.cond_shape, generator=g)
        return feed

    def torch_call(self, feed):
        with torch.no_grad():
            if self.kind == "class":
                return self.unet(feed["sample"], feed["timestep"], class_labels=feed["class_labels"]).sample
            return self.unet(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"]).sample


def calib_feeds(m: Model, n_batches: int, b: int) -> list[dict[str, torch.Tensor]]:
    if m.loaded is not None:  # real inputs: FP trajectories
        return m.record(b // 2, n_batches)
    return [m.batch(b, seed=100 + i) for i in range(n_batches)]


def ort_quantize_static(fp_path: Path, out_path: Path, np_feeds: list[dict], *, external_data: bool = False) -> None:
    """ONNX Runtime's own free quantizer as a user would run it: QDQ, per-channel INT8 weights,
    UINT8 activations, MinMax calibration over ``np_feeds`` (the peer both speed tables compare with)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(np_feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    use_external_data_format=external_data)


def build(m: Model, work: Path, feeds, threads: int) -> dict:
    """The four callables feed -> eps, plus build notes."""
    import copy
    import gc

    import onnx
    fp_path = work / "fp32.onnx"
    export_unet_onnx(m.unet, m.kind, m.shape, fp_path, cond_shape=m.cond_shape)
    np_feeds = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    # quantize_static first, while nothing else is held: it keeps every intermediate tensor of every
    # calibration batch (an SD-1.5 UNet needs > 10 GB for two batches)
    qs_path = work / "qstatic.onnx"
    t0 = time.perf_counter()
    ort_quantize_static(fp_path, qs_path, np_feeds, external_data=len(list(work.iterdir())) > 2)
    qs_time = time.perf_counter() - t0
    gc.collect()
    fq = copy.deepcopy(m.unet)
    cfg = preset("w8a8")  # minmax weight scales: the MSE search costs minutes on 860 M weights, speed is the same
    quantize_(fq, dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, scale_method="minmax")))
    m2 = Model.__new__(Model)
    m2.__dict__.update(m.__dict__)
    m2.unet = fq

    def run_batches():
        for f in feeds:
            m2.torch_call(f)

    init_act_steps(fq, run_batches, "minmax")
    plan = build_plan(fq)
    fq = m2 = None  # free the fake-quant copy before loading the ONNX
    gc.collect()
    q_model, rep = build_target_model(onnx.load(str(fp_path)), plan, "onnxruntime-cpu", np_feeds)
    int8_path = work / "int8.onnx"
    onnx.save(q_model, str(int8_path))
    del q_model, plan
    gc.collect()
    # no busy-waiting ORT threads: they would steal the cores from torch's next interleaved call
    kw = {"threads": threads, "opt_level": "all", "spinning": False}
    runners = {"ort-fp32": OrtRunner(fp_path, **kw),
               "ort-int8": OrtRunner(int8_path, disabled_optimizers=("QDQPropagationTransformer",), **kw),
               "ort-qstatic": OrtRunner(qs_path, **kw)}
    calls = {"torch-fp32": m.torch_call}
    for name, r in runners.items():
        calls[name] = (lambda feed, r=r: r.run(feed, tuple(feed["sample"].shape)))
    return {"calls": calls, "paths": {"ort-fp32": fp_path, "ort-int8": int8_path, "ort-qstatic": qs_path},
            "qstatic_time_s": round(qs_time, 1), "int8_not_represented": rep.not_represented}


def per_call(calls: dict, m: Model, batch: int, n: int, warmup: int = 3) -> dict[str, float]:
    feed = m.batch(batch)
    for _ in range(warmup):
        for f in calls.values():
            f(feed)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):  # round-robin: noise hits every variant alike
        for k, f in calls.items():
            t0 = time.perf_counter()
            f(feed)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def sample_time(calls: dict, m: Model, n: int, steps: int) -> dict[str, dict]:
    """Full DDIM sample with CFG 1.5: wall time and the share spent outside the UNet."""
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.schedules.vp import VPSchedule

    schedule = m.loaded.schedule() if m.loaded else VPSchedule.from_diffusers(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000})
    out = {}
    for k, f in calls.items():
        spent = [0.0]

        def eps(x, t, cond, f=f, spent=spent):
            feed = {"sample": x, "timestep": t.reshape(-1).expand(x.shape[0]).float()}
            feed["class_labels" if m.kind == "class" else "encoder_hidden_states"] = cond
            t0 = time.perf_counter()
            r = f(feed)
            spent[0] += time.perf_counter() - t0
            return r

        settings = SampleSettings(sampler="ddim", steps=steps, cfg=1.5, seed=0, n=n, batch_size=n)
        cond = null = None
        if m.kind == "text":
            g = torch.Generator().manual_seed(1)
            cond, null = torch.randn(n, *m.cond_shape, generator=g), torch.zeros(1, *m.cond_shape)
        t0 = time.perf_counter()
        generate(eps, schedule, m.shape, settings, num_classes=10 if m.kind == "class" else None,
                 null_label=10 if m.kind == "class" else null, cond=cond)
        wall = time.perf_counter() - t0
        out[k] = {"wall_s": wall, "unet_s": spent[0], "sampler_share": 1 - spent[0] / wall}
    return out


def op_profile(path: Path, m: Model, batch: int, threads: int, disabled=()) -> dict[str, float]:
    """ms per call by op type (ORT profiler), 5 calls after warm-up."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "saq_ort_profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    feed = {k: v.numpy() for k, v in m.batch(batch).items()}
    sess.run(None, feed)
    so.enable_profiling = True
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    for _ in range(6):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000 / 6
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,sd15")
    ap.add_argument("--batches", default="1,8,32", help="digits batch sizes")
    ap.add_argument("--sd-batches", default="1,2", help="SD-1.5-config batch sizes (one call at batch 32 takes ~a minute on 2 cores)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sd-calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed-ort")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": "python benchmarks/speed.py " + " ".join(os.sys.argv[1:]),
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads},
               "versions": __import__("saq_deploy.utils.versions", fromlist=["x"]).package_versions(), "models": {}}
    for name in args.models.split(","):
        m = Model(name)
        sd = name != "digits"
        batches = [int(b) for b in (args.sd_batches if sd else args.batches).split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            feeds = calib_feeds(m, 2 if sd else 10, 2 if sd else 16)
            v = build(m, Path(tmp), feeds, args.threads)
            r = {"build_s": round(time.perf_counter() - t0, 1), "qstatic_time_s": v["qstatic_time_s"],
                 "params_m": round(sum(p.numel() for p in m.unet.parameters()) / 1e6, 2),
                 "latency_ms": {}, "int8_notes": v["int8_not_represented"]}
            for b in batches:
                print(f"[{name}] batch {b}: {args.sd_calls if sd else args.calls} calls x {len(VARIANTS)} variants", flush=True)
                r["latency_ms"][str(b)] = per_call(v["calls"], m, b, args.sd_calls if sd else args.calls)
                print("   ", {k: round(x, 2) for k, x in r["latency_ms"][str(b)].items()}, flush=True)
            r["sample"] = sample_time(v["calls"], m, n=1 if sd else 8, steps=10)
            pb = batches[-1]
            r["profile_batch"] = pb
            r["profile_ms"] = {"ort-fp32": op_profile(v["paths"]["ort-fp32"], m, pb, args.threads),
                               "ort-int8": op_profile(v["paths"]["ort-int8"], m, pb, args.threads,
                                                      ("QDQPropagationTransformer",))}
        results["models"][name] = r
        del v, m
    from benchmarks.speed_report import write_report

    write_report(results, args.out)


if __name__ == "__main__":
    main()
