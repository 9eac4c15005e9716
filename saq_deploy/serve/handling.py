"""From a validated request body to sampling work, and from images to PNGs (no FastAPI here).

Everything a request may ask is checked against the server's limits and the model: the class
label range, the embedding shape and values, guidance inputs, and the calibrated envelope
(sampler, steps, spacing the artifact was calibrated for). Each refusal is a ``Refused`` with
an HTTP status and one clear sentence.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass

import torch

from saq_deploy.models.text_encoder import truncation_warning
from saq_deploy.serve.config import ServeConfig
from saq_deploy.serve.model import GenSpec, ServedModel

PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Plan:
    spec: GenSpec
    labels: list[int] | None
    seed: int
    warnings: list[str]
    in_envelope: bool


def envelope_issues(calibrated_for: dict | None, sampler: str, steps: int, spacing: str | None) -> list[str]:
    """Why (sampler, steps, spacing) lies outside what the model was calibrated for; [] inside."""
    if not calibrated_for:
        return ["this model records no calibrated sampler envelope: quality is not validated"]
    samplers = list(calibrated_for.get("samplers") or [])
    cal_steps = calibrated_for.get("steps")
    allowed = list(cal_steps) if isinstance(cal_steps, list | tuple) else [cal_steps]
    cal_spacing = calibrated_for.get("spacing")
    issues = []
    if sampler not in samplers:
        issues.append(f"sampler '{sampler}' is outside the calibrated envelope ({', '.join(samplers)})")
    if steps not in allowed:
        issues.append(f"steps={steps} is outside the calibrated envelope ({', '.join(map(str, allowed))})")
    if cal_spacing and spacing != cal_spacing:
        issues.append(f"spacing '{spacing or 'sampler default'}' is outside the calibrated envelope ({cal_spacing})")
    return issues


def plan_request(served: ServedModel, config: ServeConfig, req) -> Plan:
    """Check ``req`` (a GenerateRequest) against ``config`` and ``served``; build its GenSpec."""
    if req.n > config.max_n:
        raise Refused(422, f"n={req.n} is above this server's limit of {config.max_n} images per request")
    if req.cfg > config.max_cfg:
        raise Refused(422, f"cfg={req.cfg} is above this server's limit of {config.max_cfg}")
    cal = served.calibrated_for or {}
    steps = req.steps if req.steps is not None else _default_steps(cal, config)
    if steps > config.max_steps:
        raise Refused(422, f"steps={steps} is above this server's limit of {config.max_steps}")
    sampler = req.sampler or (cal.get("samplers") or ["ddim"])[0]
    spacing = req.spacing or cal.get("spacing")
    issues = envelope_issues(served.calibrated_for, sampler, steps, spacing)
    if issues and config.strict:
        raise Refused(422, "; ".join(issues) + " (this server runs with --strict)")
    cond, null, labels, text_warnings = _conditioning(served, config, req)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
    from saq_deploy.generate import initial_noise

    cfg = float(req.cfg) if served.kind != "uncond" else 1.0
    spec = GenSpec(sampler=sampler, steps=steps, cfg=cfg, spacing=spacing,
                   x_T=initial_noise(served.sample_shape, req.n, seed), cond=cond, null=null)
    warnings = text_warnings + [f"{i}: quality not validated" for i in issues]
    return Plan(spec, labels, seed, warnings, not issues)


def _default_steps(cal: dict, config: ServeConfig) -> int:
    steps = cal.get("steps")
    steps = steps[0] if isinstance(steps, list | tuple) and steps else steps
    return steps if isinstance(steps, int) and steps >= 1 else min(10, config.max_steps)


def _conditioning(served: ServedModel, config: ServeConfig, req):
    """(cond, null, labels, warnings) for the model's kind; Refused(422) for inputs it cannot take."""
    text_given = req.prompt is not None or req.negative_prompt is not None
    if served.kind == "class":
        if req.embedding is not None or req.negative_embedding is not None or text_given:
            what = "a prompt" if text_given else "an embedding"
            raise Refused(422, f"this model is class-conditional: send 'label', not {what}")
        k = served.num_classes or 0
        if req.label is not None and req.label >= k:
            raise Refused(422, f"label {req.label} is outside 0..{k - 1} for this model")
        if req.cfg != 1.0 and served.null_label is None:
            raise Refused(422, "this model has no null class for classifier-free guidance: use cfg=1")
        if req.label is None:
            labels = torch.arange(req.n, dtype=torch.long) % k
        else:
            labels = torch.full((req.n,), req.label, dtype=torch.long)
        return labels, None, labels.tolist(), []
    if req.label is not None:
        raise Refused(422, f"this model is {'unconditional' if served.kind == 'uncond' else 'cross-attention'}: "
                      "'label' does not apply")
    if served.kind == "uncond":
        if req.embedding is not None or req.negative_embedding is not None or text_given:
            raise Refused(422, f"this model is unconditional: '{'prompt' if text_given else 'embedding'}' "
                          "does not apply")
        return None, None, None, []
    if text_given:
        return _from_prompts(served, req)
    if req.embedding is None:
        how = ("'prompt' (text) or 'embedding' as an (L, D) array of numbers" if served.prompts.accepted else
               f"'embedding' as an (L, D) array of numbers ({served.prompts.reason})")
        raise Refused(422, f"this model uses cross-attention: send {how}")
    emb = _embedding(served, config, req.embedding, "embedding")
    null = None
    if req.cfg != 1.0:
        if req.negative_embedding is None:
            raise Refused(422, "cfg != 1 on a cross-attention model needs 'negative_embedding' (the "
                          "unconditional embedding, same shape as 'embedding'), or use cfg=1")
        null = _embedding(served, config, req.negative_embedding, "negative_embedding")
        if null.shape != emb.shape:
            raise Refused(422, f"'negative_embedding' has shape {tuple(null.shape)} but 'embedding' has "
                          f"{tuple(emb.shape)}")
    return emb.unsqueeze(0).expand(req.n, -1, -1).contiguous(), null, None, []


def _from_prompts(served: ServedModel, req):
    """Conditioning from text: the prompt (and at cfg != 1 the negative prompt, default "", as
    diffusers) through the pipeline's text encoder, truncated like diffusers with a warning."""
    if req.embedding is not None or req.negative_embedding is not None:
        raise Refused(422, "send either 'prompt' / 'negative_prompt' (text) or 'embedding' / "
                      "'negative_embedding' (arrays), not both")
    if req.prompt is None:
        raise Refused(422, "'negative_prompt' needs 'prompt'")
    if not served.prompts.accepted:
        raise Refused(422, f"this model does not take prompts: {served.prompts.reason}")
    encoder = served.prompts.encoder
    warnings = []
    emb, cut = encoder.encode(req.prompt)
    _warn_cut(warnings, "prompt", cut, encoder.max_length)
    null = None
    if req.cfg != 1.0:
        null, cut = encoder.encode(req.negative_prompt)  # None: diffusers' default negative
        _warn_cut(warnings, "negative_prompt", cut, encoder.max_length)
    elif req.negative_prompt is not None:  # diffusers also ignores it without guidance
        warnings.append("'negative_prompt' is unused at cfg=1 (no classifier-free guidance)")
    return emb.unsqueeze(0).expand(req.n, -1, -1).contiguous(), null, None, warnings


def _warn_cut(warnings: list[str], name: str, cut: tuple[int, str] | None, max_length: int) -> None:
    if cut is not None:
        warnings.append(truncation_warning(f"'{name}'", cut[0], max_length, cut[1]))


def _embedding(served: ServedModel, config: ServeConfig, rows: list[list[float]], name: str) -> torch.Tensor:
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise Refused(422, f"'{name}' must be a non-empty rectangular (L, D) array")
    tokens, dim = len(rows), len(rows[0])
    if tokens > config.max_tokens:
        raise Refused(422, f"'{name}' has {tokens} rows; this server's limit is {config.max_tokens}")
    if served.cond_dim is not None and dim != served.cond_dim:
        raise Refused(422, f"'{name}' rows have width {dim}; this model needs {served.cond_dim}")
    if served.cond_tokens is not None and tokens != served.cond_tokens:
        raise Refused(422, f"'{name}' has {tokens} rows; this engine was built for {served.cond_tokens}")
    t = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise Refused(422, f"'{name}' holds non-finite numbers")
    return t


def encode_pngs(images: torch.Tensor) -> tuple[list[bytes], int, int, str]:
    """(N, C, H, W) in [-1, 1] -> (PNG bytes per image, width, height, PIL mode)."""
    from PIL import Image

    from saq_deploy.utils.images import to_uint8

    arr = to_uint8(images)
    _, h, w, c = arr.shape
    mode = PNG_MODES.get(c)
    if mode is None:
        raise ValueError(f"cannot write {c}-channel samples as PNG")
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if c == 1 else a, mode=None).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, w, h, mode
