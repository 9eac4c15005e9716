"""When the parity gate fails: is the engine wrong, or is the quantized model this fragile?

The gate compares two deterministic INT8 computations. A correct engine still sums in another
order than PyTorch, and a difference of one float32 ULP at a rounding tie flips one integer code;
in a quantized network each flip perturbs the next layers' inputs, which flips more codes. On most
models that stays far below the gate's thresholds, but on a chaotic one (measured: a random-weight
SD-1.5-config UNet, docs/results/sd15-prompt-path.md) it grows to the level of the quantization
noise itself, and no implementation passes an absolute threshold — PyTorch run in float64 included.

So a failed gate also measures the model's own numerical floor: the reference (the fake-quant
model with the engine's placement) in float32 against itself in float64, on the same calls. An
engine whose error is at that floor did what its graph says; one far below it has a real mismatch.
The verdict is reported, never used to pass the gate."""

from __future__ import annotations

import math

import torch

# engine vs reference within this many dB of the reference's own float32-vs-float64 SNR: "at the floor"
FLOOR_MARGIN_DB = 3.0


def floor_verdict(engine_mean_snr_db: float, floor_mean_snr_db: float) -> tuple[bool, str]:
    """(at the floor?, one sentence saying so with both figures)."""
    at_floor = engine_mean_snr_db >= floor_mean_snr_db - FLOOR_MARGIN_DB
    figures = (f"engine vs reference mean SNR {engine_mean_snr_db:.1f} dB, the reference's own float32 vs "
               f"float64 difference {floor_mean_snr_db:.1f} dB")
    if at_floor:
        return True, (f"{figures}: the engine is at this model's numerical floor (float rounding ties flipped "
                      "by summation order cascade through its quantized layers), so the gate's absolute "
                      "thresholds cannot be met on this model by any runtime; judge the deployment by the engine's "
                      "samples against FP32 (their quality), not by this gate")
    return False, (f"{figures}: the engine is {floor_mean_snr_db - engine_mean_snr_db:.1f} dB below the model's "
                   "numerical floor, a real mismatch between the engine and the model it was built from")


@torch.no_grad()
def numerical_floor(eps_model, unet: torch.nn.Module, calls, engine_mean_snr_db: float) -> dict:
    """The reference's float32-vs-float64 SNR on ``calls``; ``unet`` (the module ``eps_model``
    runs) is cast to float64 in place for the second pass and back afterwards (exact: every float32
    value is a float64 value), so no second copy of the weights is held."""
    from saq_deploy.validate.parity import snr_db

    ref32 = [eps_model(c.x, c.t, c.cond) for c in calls]
    try:
        unet.double()
        ref64 = [eps_model(c.x.double(), c.t, c.cond) for c in calls]
    except (RuntimeError, TypeError) as e:  # a layer that cannot run in float64: say so, do not guess
        return {"measured": False, "note": f"numerical floor not measured ({type(e).__name__}: {e})"}
    finally:
        unet.float()
    per_call = [snr_db(b, a) for a, b in zip(ref32, ref64, strict=True)]
    finite = [v for v in per_call if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else math.inf
    at_floor, verdict = floor_verdict(engine_mean_snr_db, mean)
    return {"measured": True, "mean_snr_db": mean, "per_call_snr_db": per_call, "at_floor": at_floor,
            "margin_db": FLOOR_MARGIN_DB, "verdict": verdict}
