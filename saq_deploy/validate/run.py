"""``validate_engine``: the parity gate, then (only if it passes) quality figures.

1. record (x, t, cond) along the fake-quant model's own DDIM and DPM-Solver++ trajectories; the
   fake-quant model also rounds the layer outputs the engine's exported graph quantizes and uses
   its INT32 biases (ONNX Runtime: every fused conv), read from that graph: ``validate/reference.py``;
2. per call: engine vs fake-quant (cosine, SNR, max-abs) and both vs FP (direction error);
3. end to end: final samples of engine and fake-quant from the same seeds (PSNR);
4. compare with the thresholds in the engine manifest; write ``<engine>/parity.json``;
5. passed: digit-FID / IS / accuracy of engine samples vs FP samples, the per-step plot and a
   markdown report under ``<artifact>/validation/<backend>/``. Failed: no quality figures.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict
from pathlib import Path

from saq_deploy.errors import ConfigError, ModelLoadError

PARITY_FILE = "parity.json"


def check_force(force: bool, backend: str) -> None:
    """Refuse an unknown backend, and ``--force`` where the backend rules it out, before the (slow)
    artifact load."""
    from saq_deploy.backends.registry import get_backend

    get_backend(backend).check_force(force)


def _quality(engine_eps, fq, fp_eps, n: int, steps: int, seed: int) -> dict | None:
    """Digit metrics of engine vs FP samples (1x16x16 class-conditional models only)."""
    from saq_deploy.eval.metrics import evaluate_samples
    from saq_deploy.generate import SampleSettings, generate

    loaded = fq.loaded
    if getattr(loaded, "image_shape", loaded.sample_shape) != (1, 16, 16) or loaded.kind != "class":
        return None
    settings = SampleSettings(sampler="ddim", steps=steps, spacing="quadratic", cfg=1.5, seed=seed, n=n)
    out = {"settings": settings.to_dict()}
    for name, eps in (("fp32", fp_eps), ("engine", engine_eps)):
        imgs, labels = generate(eps, loaded.schedule(), loaded.sample_shape, settings,
                                num_classes=loaded.num_classes, null_label=loaded.null_label)
        out[name] = evaluate_samples(loaded.decode(imgs), labels)  # a pipeline's VAE decodes latents
    return out


def validate_engine(artifact: str | Path, backend: str = "onnxruntime", engine: str | Path | None = None, *,
                    n: int = 16, steps: int = 10, samplers: tuple[str, ...] = ("ddim", "dpmpp-2m"),
                    quality_n: int = 200, seed: int = 1000, out_dir: str | Path | None = None,
                    log=print, force: bool = False) -> dict:
    """Run the gate (and quality if it passes); returns the result dict (``passed`` key).
    ``force``: see :func:`saq_deploy.backends.engine.load_engine`."""
    from saq_deploy.backends.engine import load_engine
    from saq_deploy.backends.registry import default_engine_dir
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.export.feeds import record_calls
    from saq_deploy.generate import SampleSettings
    from saq_deploy.models.eps_model import TorchEpsModel
    from saq_deploy.utils.io import write_json_atomic
    from saq_deploy.validate import parity as P
    from saq_deploy.validate.floor import numerical_floor
    from saq_deploy.validate.reference import placement_reference
    from saq_deploy.validate.report import write_report

    if n < 1 or steps < 1 or quality_n < 0:
        raise ConfigError("validate needs n >= 1, steps >= 1 and quality-n >= 0")
    check_force(force, backend)
    artifact = Path(artifact)
    engine_dir = Path(engine) if engine else default_engine_dir(artifact, backend)
    fq = load_artifact(artifact)
    eng = load_engine(engine_dir, force=force)
    if eng.backend != backend:
        raise ConfigError(f"engine '{engine_dir}' is a {eng.backend} engine, not {backend}")
    if eng.manifest["source"]["state_sha256"] != fq.manifest["state_sha256"]:
        raise ModelLoadError(f"engine '{engine_dir}' was built from a different calibration than '{artifact}' "
                             "(state hash mismatch): rebuild it with saq-deploy build-engine")
    t0 = time.perf_counter()
    fq_eps, en_eps, fp_eps = fq.eps_model(), eng.eps_model(), TorchEpsModel(fq.fp_unet)
    log(f"recording {len(samplers)} x {steps}-step trajectories of {n} samples ...")
    # the reference rounds what the engine's graph rounds (validate/reference.py)
    cond, null = fq.prompt_cond(n)  # a text UNet: its calibration prompts, CFG on the negative prompt
    cfg = 1.0 if cond is not None and null is None else 1.5
    with placement_reference(fq, artifact, eng.manifest, log) as placement:
        calls = record_calls(fq_eps, fq.loaded, samplers=samplers, steps=steps, n=n, seed=seed, cfg=cfg,
                             cond=cond, null_cond=null)
        res = P.ParityResult(steps=P.measure_calls(calls, fq_eps, en_eps, fp_eps))
        for sampler in samplers:
            settings = SampleSettings(sampler=sampler, steps=steps, cfg=cfg, seed=seed, n=n)
            res.psnr[sampler], _, _ = P.final_sample_psnr(fq_eps, en_eps, fq.loaded, settings, cond=cond,
                                                          null_cond=null)
        ref_out = [fq_eps(c.x, c.t, c.cond) for c in calls] if placement["modelled_outputs"] else []
        summary = res.summary()
        thresholds = eng.manifest["parity"]
        fails = P.check_thresholds(summary, thresholds)
        # a failed gate: engine bug, or a model whose own float32 rounding already differs this much?
        floor = numerical_floor(fq_eps, fq.loaded.unet, calls, summary["mean_snr_db"]) if fails else None
    if floor is not None:
        log(floor.get("verdict") or floor["note"])
    if ref_out:  # what the placement's own roundings cost: reference vs the plain fake-quant model
        snrs = [P.snr_db(fq_eps(c.x, c.t, c.cond), r) for c, r in zip(calls, ref_out, strict=True)]
        placement["mean_snr_db_vs_fakequant"] = sum(snrs) / len(snrs)
    passed = not fails
    gate = {"passed": passed, "failures": fails, "thresholds": thresholds, "metrics": summary,
            "engine_files": eng.manifest["files"], "state_sha256": fq.manifest["state_sha256"],
            "settings": {"n": n, "steps": steps, "samplers": list(samplers), "seed": seed},
            "validated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    write_json_atomic(engine_dir / PARITY_FILE, gate)
    result = {"artifact": str(artifact), "engine": str(engine_dir), "backend": backend, **gate,
              "method": fq.manifest["method"], "bits": fq.manifest["bits"],
              "not_represented": eng.manifest.get("qdq", {}).get("not_represented", []),
              "placement": placement, "numerical_floor": floor,
              "steps_detail": [asdict(s) for s in res.steps]}
    if passed and quality_n > 0:
        log(f"parity passed; sampling {quality_n} digits with FP32 and the engine for quality ...")
        result["quality"] = _quality(en_eps, fq, fp_eps, quality_n, steps, seed)
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out_dir) if out_dir else artifact / "validation" / backend
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    write_json_atomic(out / "result.json", json.loads(json.dumps(result, default=str)))
    result["report_dir"] = str(out)
    return result
