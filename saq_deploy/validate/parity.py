"""Parity of an engine with the fake-quant PyTorch model it was built from.

Per UNet call, on (x, t, cond) recorded along the fake-quant model's own sampling trajectories:
cosine, SNR (dB) and max-abs of engine vs fake-quant, plus each one's direction error against
the FP model (cosine(eps_quant, eps_FP)) for the per-step plot. End to end: PSNR of the final
samples of engine and fake-quant runs from the same seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PSNR_PEAK = 2.0  # samples live in [-1, 1]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    err = (ref.double() - test.double()).pow(2).sum()
    if float(err) == 0.0:
        return math.inf
    return float(10 * torch.log10(ref.double().pow(2).sum() / err))


def psnr_db(ref: torch.Tensor, test: torch.Tensor, peak: float = PSNR_PEAK) -> float:
    mse = float((ref.double() - test.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@dataclass
class StepRecord:
    sampler: str
    step: int
    t: float
    cosine: float  # engine vs fake-quant
    snr_db: float
    max_abs: float
    dir_engine: float  # cosine(eps_engine, eps_FP)
    dir_fakequant: float  # cosine(eps_fakequant, eps_FP)


@dataclass
class ParityResult:
    steps: list[StepRecord] = field(default_factory=list)
    psnr: dict[str, float] = field(default_factory=dict)  # sampler -> PSNR of final samples

    def summary(self) -> dict:
        snrs = sorted(s.snr_db for s in self.steps)
        finite = [v for v in snrs if math.isfinite(v)]
        return {
            "calls": len(self.steps),
            "min_cosine": min(s.cosine for s in self.steps),
            "median_cosine": sorted(s.cosine for s in self.steps)[(len(self.steps) - 1) // 2],
            "min_snr_db": snrs[0],
            "p10_snr_db": snrs[int(0.1 * (len(snrs) - 1))],
            "mean_snr_db": (sum(finite) / len(finite)) if finite else math.inf,
            "max_abs": max(s.max_abs for s in self.steps),
            "min_psnr_db": min(self.psnr.values()) if self.psnr else math.inf,
            "psnr_db": dict(self.psnr),
        }


# (summary key, threshold key, label): every gated quantity must be >= its threshold
GATED = (("median_cosine", "min_median_cosine", "median cosine"),
         ("p10_snr_db", "min_p10_snr_db", "10th-percentile SNR (dB)"),
         ("mean_snr_db", "min_mean_snr_db", "mean SNR (dB)"),
         ("min_psnr_db", "min_psnr_db", "final-sample PSNR (dB)"))


def check_thresholds(summary: dict, thresholds: dict) -> list[str]:
    """Human-readable failures (empty = passed)."""
    return [f"{label} {summary[key]:.4g} < {thresholds[tkey]}" for key, tkey, label in GATED
            if tkey in thresholds and summary[key] < thresholds[tkey]]


def measure_calls(calls, fq_eps, engine_eps, fp_eps) -> list[StepRecord]:
    """Run fake-quant, engine and FP on every recorded call."""
    out = []
    for c in calls:
        e_fq, e_en, e_fp = fq_eps(c.x, c.t, c.cond), engine_eps(c.x, c.t, c.cond), fp_eps(c.x, c.t, c.cond)
        out.append(StepRecord(c.sampler, c.step, float(c.t.float().mean()), cosine(e_en, e_fq), snr_db(e_fq, e_en),
                              float((e_en - e_fq).abs().max()), cosine(e_en, e_fp), cosine(e_fq, e_fp)))
    return out


def final_sample_psnr(fq_eps, engine_eps, model_info, settings, *, cond: torch.Tensor | None = None,
                      null_cond: torch.Tensor | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Sample with both models from the same seeds; PSNR of engine vs fake-quant samples. A text
    UNet: ``cond`` (n, L, D) prompt embeddings, ``null_cond`` (1, L, D) the negative prompt's."""
    from saq_deploy.generate import generate

    kw = {"num_classes": model_info.num_classes, "cond": cond,
          "null_label": model_info.null_label if null_cond is None else null_cond}
    a, _ = generate(fq_eps, model_info.schedule(), model_info.sample_shape, settings, **kw)
    b, _ = generate(engine_eps, model_info.schedule(), model_info.sample_shape, settings, **kw)
    return psnr_db(a, b), a, b
