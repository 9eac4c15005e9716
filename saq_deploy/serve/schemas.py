"""Request and response bodies (pydantic; imported only by the app).

Strict types: ``"5"`` is not an integer and ``true`` is not a count. Unknown fields are refused,
so a request cannot smuggle a model name, a path or an engine option. Absolute caps live here;
the server's own (tighter) limits are checked in the app against its ``ServeConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from saq_deploy.serve.config import HARD_MAX_CFG, HARD_MAX_N, HARD_MAX_STEPS

# Same names as saq_deploy.samplers.registry.SAMPLERS and schedules.spacing.SPACINGS (a test checks).
SamplerName = Literal["ddim", "plms", "dpm-solver-2", "dpmpp-2m", "unipc"]
SpacingName = Literal["leading", "trailing", "linspace", "quadratic", "logsnr"]
MAX_SEED = 2**63 - 1
# far above any tokenizer's maximum (CLIP: 77 tokens, a few hundred characters): longer prompts are
# truncated with a warning as diffusers does; this cap only bounds the tokenizer's work per request
MAX_PROMPT_CHARS = 4096


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"label": 3, "n": 1, "steps": 10, "sampler": "ddim", "cfg": 1.5, "seed": 0}]})

    label: int | None = Field(None, ge=0, description="Class label (class-conditional models). "
                              "Omitted: labels cycle 0, 1, 2, ... over the n images.")
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Cross-attention models whose pipeline has a "
        "tokenizer and text encoder (/v1/model prompts.accepted): the prompt, encoded by the server. "
        "Longer than the tokenizer's maximum: truncated, with a warning. Exclusive with 'embedding'.")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="With 'prompt', cfg != 1: the negative prompt "
        "(classifier-free guidance's unconditional input). Omitted: the empty prompt, as diffusers.")
    embedding: list[list[float]] | None = Field(
        None, description="Cross-attention models: the prompt embedding as an (L, D) array of numbers "
        "(L tokens of width D, as /v1/model reports). Never a path.")
    negative_embedding: list[list[float]] | None = Field(
        None, description="Cross-attention models: the unconditional (L, D) embedding that "
        "classifier-free guidance needs when cfg != 1.")
    n: int = Field(1, ge=1, le=HARD_MAX_N, description="Images to generate (server limit in /v1/model).")
    steps: int | None = Field(None, ge=1, le=HARD_MAX_STEPS,
                              description="Sampling steps. Omitted: the steps the model was calibrated for.")
    sampler: SamplerName | None = Field(None, description="Omitted: the first sampler it was calibrated for.")
    spacing: SpacingName | None = Field(None, description="Timestep spacing. Omitted: the calibrated one.")
    cfg: float = Field(1.5, ge=0, le=HARD_MAX_CFG, allow_inf_nan=False,
                       description="Classifier-free guidance scale (1: no guidance).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Noise seed. Omitted: a random one "
                             "(returned in the response).")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="PNG files, base64-encoded, one per image.")
    labels: list[int] | None
    width: int
    height: int
    mode: str = Field(description="PIL mode of the PNGs: L (1 channel), LA, RGB or RGBA (4: latents).")
    sampler: str
    steps: int
    spacing: str | None
    cfg: float
    seed: int
    in_envelope: bool = Field(description="Sampler/steps/spacing are ones the model was calibrated for.")
    warnings: list[str]
    batch_images: int = Field(description="Images in the engine run that served this request.")
    queue_ms: float
    run_ms: float


class ErrorResponse(BaseModel):
    error: str
    detail: list[dict] | None = None


class ReadyResponse(BaseModel):
    ready: bool
    reason: str
    backend: str
    gate: dict
    queue_depth: int
