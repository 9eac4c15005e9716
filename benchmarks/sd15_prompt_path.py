"""SD-1.5 recipe template through the public CLI's prompt path, on CPU (issue 12).

Builds an SD-1.5-config pipeline folder with random, seeded weights (``unet/`` a diffusers
``UNet2DConditionModel`` with SD-1.x's config, ``text_encoder/`` a ``CLIPTextModel`` with SD-1.5's
text-encoder shape, ``tokenizer/`` a CLIPTokenizer over the project's small character-level BPE
vocabulary with 77 tokens, ``scheduler/`` SD-1.5's PNDM config, ``model_index.json``), writes a
runnable recipe from ``calibration/templates/sd15_w8a8_sa-ptq.toml`` (text prompts instead of the
embeddings file), then runs ``saq-deploy calibrate`` (an observer method) / ``export`` / ``lint`` /
``build-engine`` / ``validate`` / ``sample --engine`` as subprocesses, timing each (wall clock and
peak RSS). Then: latency of the built ONNX Runtime INT8 engine vs ONNX Runtime FP32 of the same
UNet, interleaved, on the artifact's stored prompt embeddings (batch 1 = one prompt, batch 2 = a
[negative; prompt] CFG pair), and the cost of block reconstruction: the project's capture +
``reconstruct_block`` (what ``calibrate --method brecq/sa-ptq`` runs per block) timed in process on a
few blocks of the calibrated artifact, extrapolated to the template's settings (a CLI brecq run
would first repeat calibrate's quantize + observer phase, ~17 min here, before its first block).
The latent is 32x32 by default (the real SD-1.5 uses 64x64 = 512 px): CPU cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd15_prompt_path.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd15_prompt_path.py --work runs/sd15-pipeline \\
        --calls 10 --recon-iters 12 --skip sample

Stages already done (recorded in ``<work>/bench_state.json``, outputs present) are not re-run;
``--redo STAGE,...`` forces them. Writes ``docs/results/sd15-prompt-path.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "calibration" / "templates" / "sd15_w8a8_sa-ptq.toml"
CLI = str(Path(sys.executable).with_name("saq-deploy"))
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "a red bicycle leaning against a brick wall", "a bowl of ramen, studio lighting"]
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def build_pipeline(folder: Path, latent: int, seed: int) -> dict:
    """SD-1.5-config folder, random weights, safetensors."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from saq_deploy.reference.text_data import BOS, EOS, vocabulary

    t0, tmp = time.perf_counter(), folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    vocab, merges = vocabulary()  # the project's character-level CLIP BPE (write_tokenizer's, but 77 tokens)
    (tmp / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(tmp / "tokenizer" / "vocab.json"), str(tmp / "tokenizer" / "merges.txt"),
                        model_max_length=77, pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS)
    tok.save_pretrained(str(tmp / "tokenizer"))
    torch.manual_seed(seed)
    # diffusers' defaults are SD-1.x's UNet (320/640/1280/1280, 8 heads, layers_per_block 2)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    n_unet = sum(p.numel() for p in unet.parameters())
    del unet
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=768, bos_token_id=vocab[BOS],
                                      eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    n_te = sum(p.numel() for p in te.parameters())
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"]}, indent=2))
    tmp.rename(folder)
    return {"wall_s": round(time.perf_counter() - t0, 1), "unet_params": n_unet, "text_encoder_params": n_te, "tokenizer_vocab": len(vocab), "latent": latent}


def write_recipe(path: Path, pipeline: Path) -> str:
    """The template with spec = the folder and [prompts] as text (everything else unchanged)."""
    text = TEMPLATE.read_text()
    text = re.sub(r'^spec = .*$', f'spec = "{pipeline.resolve()}"', text, count=1, flags=re.MULTILINE)
    prompts = "prompts = [" + ", ".join(json.dumps(p) for p in PROMPTS) + ']\nnegative_prompt = ""'
    text = re.sub(r'^embeddings_file = .*$', prompts, text, count=1, flags=re.MULTILINE)
    text = "# written by benchmarks/sd15_prompt_path.py from " + TEMPLATE.relative_to(ROOT).as_posix() + "\n" + text
    path.write_text(text)
    return text


def run_cli(args: list[str], log: Path) -> dict:
    """Run ``saq-deploy ARGS``; wall clock, peak RSS (wait4), exit code, timestamped output lines."""
    env = dict(os.environ, SAQ_DEPLOY_PROGRESS_INTERVAL="0")  # a progress line per update
    t0 = time.perf_counter()
    p = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    with log.open("w") as fh:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            fh.write(f"[{time.perf_counter() - t0:8.1f}s] {line}")
            fh.flush()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    print(f"  {args[0]}: rc {p.returncode}, {wall:.1f} s, peak RSS {ru.ru_maxrss / 1e6:.2f} GB", flush=True)
    return {"command": "saq-deploy " + " ".join(args), "rc": p.returncode, "wall_s": round(wall, 1),
            "peak_rss_gb": round(ru.ru_maxrss / 1e6, 2), "tail": lines[-6:],
            "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)}


def speed(art: Path, engine: Path, fp_onnx: Path, calls: int, threads: int) -> dict:
    """ORT INT8 engine vs ORT FP32 (same UNet), interleaved, on the artifact's stored text states."""
    import torch
    from safetensors.torch import load_file

    from saq_deploy.backends.onnxruntime import OrtRunner

    man = json.loads((art / "manifest.json").read_text())
    table = load_file(str(art / man["prompts"]["file"]))["table"]
    p = int(man["prompts"]["prompts"])
    em = json.loads((engine / "manifest.json").read_text())
    shape = em["shapes"]["sample"]
    kw = {"threads": threads, "opt_level": "all", "spinning": False}
    dis = tuple(em["build"].get("disabled_optimizers") or ("QDQPropagationTransformer",))  # as the engine loads
    runners = {"ort-fp32": OrtRunner(fp_onnx, **kw),
               "ort-int8 (engine)": OrtRunner(engine / em["engine_file"], disabled_optimizers=dis, **kw)}
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in (1, 2):
        ehs = table[0:1] if b == 1 else torch.cat([table[p:p + 1], table[0:1]])  # [negative; prompt]
        feed = {"sample": torch.randn(b, *shape, generator=g), "timestep": torch.full((b,), 501.0),
                "encoder_hidden_states": ehs.contiguous()}
        _ = [r.run(feed, tuple(feed["sample"].shape)) for r in runners.values()]  # warm-up
        times = {k: [] for k in runners}
        for _ in range(calls):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r.run(feed, tuple(feed["sample"].shape))
                times[k].append(time.perf_counter() - t0)
        med = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
        rows.append({"batch": b, "median_ms": med, "min_ms": {k: round(min(v) * 1000, 1) for k, v in times.items()},
                     "speedup_int8_vs_fp32": round(med["ort-fp32"] / med["ort-int8 (engine)"], 2)})
        print(f"  batch {b}: {med}", flush=True)
    return {"threads": threads, "calls": calls, "inputs": "encoder_hidden_states = rows of the artifact's "
            "prompts.safetensors (batch 1: prompt 0; batch 2: [negative ''; prompt 0]); sample randn, t=501",
            "rows": rows}


def recon_micro(art: Path, iters: int, names: list[str]) -> dict:
    """The project's block reconstruction (capture + reconstruct_block, the loop calibrate runs) on a
    few blocks of the calibrated artifact's fake-quant UNet, in process: 16 inputs (= --num-samples 2
    x --steps 4 x CFG) with the stored prompt rows as text states, template batch 8, ``iters`` iterations."""
    import torch

    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.calibrate.blocks import capture, find_blocks
    from saq_deploy.calibrate.reconstruct import ReconSettings, reconstruct_block
    from saq_deploy.calibrate.steps import _leaf_types

    t0 = time.perf_counter()
    q = load_artifact(art)
    load_s = time.perf_counter() - t0
    unet, fp = q.loaded.unet, q.fp_unet.eval()
    cond, null = q.prompt_cond(8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, *q.loaded.sample_shape, generator=g), torch.linspace(1, 751, 8).repeat(2)
    ehs = torch.cat([cond, null.expand(8, -1, -1)])  # each record with its prompt and with the negative

    def feeds(m):
        return [lambda m=m: m(x, t, encoder_hidden_states=ehs, return_dict=False)]
    with torch.no_grad():
        blocks = {n: b for n, b in find_blocks(unet, feeds(unet)[0]) if not isinstance(b, _leaf_types())}
    fp_mod = dict(fp.named_modules())
    rs = json.loads((art / "recipe.json").read_text())["reconstruction"]  # the template's section
    settings = ReconSettings(**{k: v for k, v in rs.items() if k not in ("iters", "max_inputs")}, iters=iters)
    rows = []
    for name in names:
        t1 = time.perf_counter()
        inputs = capture(blocks[name], feeds(unet), what="input")
        targets = capture(fp_mod[name], feeds(fp), what="output")
        cap = time.perf_counter() - t1
        ticks = []
        t2 = time.perf_counter()
        res = reconstruct_block(blocks[name], inputs, targets, t, settings, seed=0,
                                on_iter=lambda it, loss, ticks=ticks: ticks.append(time.perf_counter()))
        total = time.perf_counter() - t2
        per = statistics.median(b - a for a, b in itertools.pairwise(ticks)) if len(ticks) > 2 else None
        rows.append({"block": name, "capture_s_16_inputs": round(cap, 2), "reconstruct_s": round(total, 1),
                     "median_iter_s": None if per is None else round(per, 3), "loss_before": res["loss_before"],
                     "loss_after": res["loss_after"]})
        print(f"  {rows[-1]}", flush=True)
    return {"load_artifact_s": round(load_s, 1), "blocks_total": len(blocks), "iters": iters, "rows": rows,
            "recipe_reconstruction": rs, "block_names": list(blocks)}


def extrapolate(st: dict) -> dict | None:
    """Template cost on this machine from the measured pieces, each scaled linearly (an assumption):
    data collection by sample-steps, block capture by inputs, iterations by count."""
    cal = st.get("calibrate", {})
    tmpl = {"num_samples": 128, "steps": 50, "iters": 10000, "batch_size": 8, "max_inputs": 1024}
    pat = re.compile(r"^\[\s*([\d.]+)s\] calibrate: collect trajectories (\d+)/(\d+)")
    log = ROOT / cal["log"] if cal.get("log") else None
    coll = [(float(m[1]), int(m[2])) for ln in (log.read_text().splitlines() if log and log.exists() else [])
            if (m := pat.match(ln))]
    out: dict = {"template": tmpl}
    if len(coll) >= 2 and coll[-1][1] > coll[0][1]:
        per = (coll[-1][0] - coll[0][0]) / (coll[-1][1] - coll[0][1])  # seconds per sample-step (batch of 2 CFG)
        out["collect_per_sample_step_s"] = round(per, 2)
        out["collect_template_h"] = round(per * tmpl["num_samples"] * tmpl["steps"] / 3600, 1)
    rows = [r for r in (st.get("recon") or {}).get("rows", []) if r["median_iter_s"]]
    if rows:
        n_blocks, it = st["recon"]["blocks_total"], statistics.mean(r["median_iter_s"] for r in rows)
        cap = statistics.mean(r["capture_s_16_inputs"] for r in rows) * tmpl["max_inputs"] / 16
        out.update({"blocks": n_blocks, "measured_blocks": [r["block"] for r in rows], "per_iter_s_mean": round(it, 3),
                    "capture_s_per_block_at_1024_inputs": round(cap, 1),
                    "template_iters_h": round(it * tmpl["iters"] * n_blocks / 3600, 1),
                    "template_capture_h": round(cap * n_blocks / 3600, 1)})
        out["template_reconstruction_h"] = round(out["template_iters_h"] + out["template_capture_h"], 1)
    return out


def render(st: dict) -> str:
    s, L = st["settings"], []
    L += ["# SD-1.5 recipe template through the prompt path, on CPU (random weights)", "",
          (f"Command: `{st['command']}` (stages run as `saq-deploy` subprocesses; log lines timestamped "
          f"under `{st['work']}/logs/`)."), "",
          (f"Machine: {st['machine']['cores']} shared CPU cores ({st['machine']['cpu']}), no GPU, "
          f"OMP_NUM_THREADS={st['machine']['omp_num_threads']}; **loaded**: another CPU-heavy job ran "
          f"concurrently (load average {st['load_average_start']} at the start, {st['load_average_end']} "
          "at the end), so every time here is an upper bound for an idle machine of this kind."), "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in st["versions"].items()) + ".", "",
          "## Pipeline folder", "",
          (f"`{st['work']}/pipeline/`, built by the script with seeded random weights (safetensors): "
          f"`unet/` diffusers `UNet2DConditionModel` with SD-1.x's config ({st['build_pipeline']['unet_params']:,} "
          f"parameters, sample_size {s['latent']}: the real SD-1.5 uses 64 = 512 px), `text_encoder/` "
          f"`CLIPTextModel` with SD-1.5's text-encoder shape ({st['build_pipeline']['text_encoder_params']:,} "
          "parameters: 768 wide, 12 layers, 12 heads, MLP 3072, 77 positions, vocab 49408, quick_gelu), "
          f"`tokenizer/` a CLIPTokenizer over the project's character-level BPE vocabulary "
          f"({st['build_pipeline']['tokenizer_vocab']} tokens, `saq_deploy/reference/text_data.py`; not CLIP's "
          "49408-token BPE), model_max_length 77, `scheduler/` SD-1.5's PNDM config (scaled_linear "
          "0.00085..0.012, steps_offset 1, set_alpha_to_one false, skip_prk_steps true), `model_index.json` "
          f"(StableDiffusionPipeline). Built in {st['build_pipeline']['wall_s']} s."), "",
          ("Recipe: `calibration/templates/sd15_w8a8_sa-ptq.toml` with `spec` = that folder and `[prompts]` "
          f"= {len(PROMPTS)} text prompts + `negative_prompt = \"\"` instead of the embeddings file "
          f"(PLMS, leading spacing, CFG 7.5, W8A8 unchanged); CLI overrides `--method {s['method']} "
          f"--num-samples {s['num_samples']} --steps {s['steps']}`."), "",
          "## Stages (public CLI)", "", "| stage | command | exit | wall s | peak RSS GB |", "|---|---|---|---|---|"]
    for k in ("calibrate", "export", "lint_onnxruntime", "lint_tensorrt", "build_engine", "validate",
              "sample_engine"):
        r = st.get(k)
        if r:
            cmd = r["command"].replace(str(ROOT) + "/", "")
            L.append(f"| {k} | `{cmd}` | {r['rc']} | {r['wall_s']} | {r['peak_rss_gb']} |")
    p = st.get("parity") or {}
    L += ["", "## Parity gate (validate)", "", "```json", json.dumps(p, indent=1, default=str)[:3000], "```", ""]
    sp = st.get("speed")
    if sp:
        L += ["## Latency: built ONNX Runtime INT8 engine vs ONNX Runtime FP32 (same UNet)", "",
              (f"{sp['calls']} timed calls per variant and batch after one warm-up, interleaved; ORT "
              f"intra-op threads {sp['threads']}, ORT_ENABLE_ALL, no spinning. Inputs: {sp['inputs']}. FP32 "
              f"ONNX: `export_unet_onnx` of the pipeline's UNet ({st['fp32_onnx']['bytes'] / 1e9:.2f} GB in "
              f"{st['fp32_onnx']['files']} files: torch writes external data beyond 2 GB)."), "",
              "| batch | ORT FP32 median ms | INT8 engine median ms | FP32 / INT8 |", "|---|---|---|---|"]
        for r in sp["rows"]:
            m = r["median_ms"]
            L.append(f"| {r['batch']} | {m['ort-fp32']} | {m['ort-int8 (engine)']} | {r['speedup_int8_vs_fp32']}x |")
        L.append("")
    ex = st.get("extrapolation") or {}
    L += ["## Reconstruction cost", "", "```json", json.dumps(ex, indent=1), "```", ""]
    if st.get("recon"):
        r = {k: v for k, v in st["recon"].items() if k != "block_names"}
        L += ["Measured blocks (in process, the project's capture + reconstruct_block):", "", "```json",
              json.dumps(r, indent=1), "```", ""]
    L += ["## Not run", "", ("- No real SD-1.5 weights (nothing can be downloaded): quality figures would be "
          "meaningless on random weights, so validate ran with `--quality-n 0` (parity gate only)."),
          f"- Latent {s['latent']}x{s['latent']}, not SD-1.5's 64x64 (about 4x the UNet cost per call).",
          "- No GPU, no TensorRT engine (the TensorRT export was linted only); no VAE in the folder.",
          ("- The template's own method (sa-ptq, 10000 iterations per block, 128 samples x 50 PLMS steps): "
          "its cost is extrapolated above, not measured."), ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "sd15-pipeline")
    ap.add_argument("--latent", type=int, default=32, help="UNet sample_size (SD-1.5: 64 = 512 px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="minmax", help="observer method of the main run")
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per variant and batch")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads in the speed stage")
    ap.add_argument("--recon-iters", type=int, default=12, help="reconstruction iterations per measured block")
    ap.add_argument("--recon-blocks", default="down_blocks.0.resnets.0,down_blocks.0.attentions.0,"
                    "mid_block.attentions.0,up_blocks.3.resnets.0", help="blocks whose reconstruction is timed")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip (sample, recon)")
    ap.add_argument("--redo", default="", help="comma-separated stages to re-run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sd15-prompt-path")
    a = ap.parse_args()
    work = a.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    state_f = work / "bench_state.json"
    st = json.loads(state_f.read_text()) if state_f.exists() else {}
    redo, skip = set(filter(None, a.redo.split(","))), set(filter(None, a.skip.split(",")))
    pipe, art = work / "pipeline", work / "art-minmax"
    recipe, fp_onnx = work / "recipe.toml", work / "fp32" / "unet.onnx"
    st.setdefault("load_average_start", [round(x, 2) for x in os.getloadavg()])

    def save():
        state_f.write_text(json.dumps(st, indent=1, default=str))

    def stage(name: str, fn, done: bool):
        if name in st and done and name not in redo and st[name].get("rc", 0) in (0, 1 if name == "validate" else 0):
            print(f"{name}: kept from {state_f.name}", flush=True)
            return st[name]
        print(f"{name} ...", flush=True)
        st[name] = fn()
        save()
        return st[name]

    stage("build_pipeline", lambda: build_pipeline(pipe, a.latent, a.seed), pipe.exists())
    st["recipe_text"] = write_recipe(recipe, pipe)
    cal = ["calibrate", "-c", str(recipe), "-o", str(art), "--method", a.method,
           "--num-samples", str(a.num_samples), "--steps", str(a.steps)]
    for name, args, out in [
            ("calibrate", cal, art / "manifest.json"),
            ("export", ["export", str(art), "--calib-samples", "2"], art / "onnx" / "onnxruntime-cpu" / "manifest.json"),
            ("lint_onnxruntime", ["lint", str(art / "onnx" / "onnxruntime-cpu" / "model.onnx"), "-t",
                                  "onnxruntime-cpu"], None),
            ("lint_tensorrt", ["lint", str(art / "onnx" / "tensorrt" / "model.onnx"), "-t", "tensorrt"], None),
            ("build_engine", ["build-engine", str(art), "--backend", "onnxruntime"], art / "engine" / "manifest.json"),
            ("validate", ["validate", str(art), "-n", "1", "--steps", "3", "--quality-n", "0"],
             art / "engine" / "parity.json")]:
        r = stage(name, lambda args=args, name=name: run_cli(args, work / "logs" / f"{name}.log"),
                  out is None or out.exists())
        if r["rc"] != 0 and name != "validate":
            save()
            sys.exit(f"{name} failed (rc {r['rc']}); see {r['log']}")
    pj = art / "engine" / "parity.json"
    st["parity"] = json.loads(pj.read_text()) if pj.exists() else None
    mf = json.loads((art / "manifest.json").read_text())
    st["artifact"] = {k: mf.get(k) for k in ("method", "bits", "sampler", "steps", "num_samples", "prompts",
                                             "wall_time_s", "calibrated_for")}

    def export_fp():
        from diffusers import UNet2DConditionModel

        from saq_deploy.export.torch_export import export_unet_onnx

        shutil.rmtree(fp_onnx.parent, ignore_errors=True)
        fp_onnx.parent.mkdir(parents=True)
        unet = UNet2DConditionModel.from_pretrained(pipe / "unet").eval()
        t0 = time.perf_counter()
        export_unet_onnx(unet, "text", (4, a.latent, a.latent), fp_onnx, cond_shape=(77, 768))
        del unet
        size = sum(f.stat().st_size for f in fp_onnx.parent.iterdir())
        return {"wall_s": round(time.perf_counter() - t0, 1), "bytes": size, "files": len(list(fp_onnx.parent.iterdir()))}

    stage("fp32_onnx", export_fp, fp_onnx.exists())
    stage("speed", lambda: speed(art, art / "engine", fp_onnx, a.calls, a.threads), True)
    if "sample" not in skip:
        stage("sample_engine", lambda: run_cli(
            ["sample", "--engine", str(art / "engine"), "--sampler", "ddim", "--steps", "10", "--cfg", "7.5",
             "-n", "1", "--batch-size", "1", "--prompt", PROMPTS[0], "-o", str(work / "sample_engine.png")],
            work / "logs" / "sample_engine.log"), (work / "sample_engine.png").exists())
    if "recon" not in skip:
        stage("recon", lambda: recon_micro(art, a.recon_iters, a.recon_blocks.split(",")), True)
    st["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    st["settings"] = {"latent": a.latent, "method": a.method, "num_samples": a.num_samples, "steps": a.steps}
    st["work"] = str(work.relative_to(ROOT)) if work.is_relative_to(ROOT) else str(work)
    st["extrapolation"] = extrapolate(st)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    st["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    st["versions"] = __import__("saq_deploy.utils.versions", fromlist=["x"]).package_versions()
    st["command"] = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd15_prompt_path.py " + " ".join(sys.argv[1:])
    a.out.with_suffix(".json").write_text(json.dumps(st, indent=1, default=str) + "\n")
    a.out.with_suffix(".md").write_text(render(st))
    print(f"wrote {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
