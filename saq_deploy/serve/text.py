"""Prompts in the server: the model's own pipeline tokenizer + text encoder (FP32, CPU), loaded once
at start-up, so a cross-attention model can be asked with ``prompt`` / ``negative_prompt``.

An SDXL-class model's prompts go through both its text encoders, packed with its pooled embedding
and time ids (``models.text_encoder``), so the request path is the same.

A model whose pipeline folder has no ``tokenizer/`` / ``text_encoder/`` (or a server without
``transformers``) still serves: it accepts only ``embedding`` requests, and ``PromptSupport.reason``
says why in one client-facing line (no filesystem paths; ``detail`` has the full cause for the log).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from saq_deploy.errors import SaqError

CACHE_SIZE = 64  # encoded prompts kept: clients repeat prompts (and the negative prompt) a lot


class PromptEncoder:
    """A ``TextEncoder`` shared by request threads: one encode at a time (the tokenizer's Python
    cache and the module are not meant for concurrent calls), recent prompts cached."""

    def __init__(self, encoder, time_ids: Tensor | None = None) -> None:
        self.encoder = encoder
        self.time_ids = time_ids  # (1, 6) the model's default SDXL time ids (unused by other UNets)
        self.max_length = int(encoder.max_length)
        self.width = int(encoder.width)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str | None, tuple[Tensor, tuple[int, str] | None]] = OrderedDict()

    def encode(self, text: str | None) -> tuple[Tensor, tuple[int, str] | None]:
        """((L, D) float32 cond rows, (token count, kept text) when truncated, else None); ``None``:
        no negative prompt given (diffusers' default: the empty prompt, or SDXL's zeros)."""
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
            cut = [] if text is None else self.encoder.truncated([text])
            out = (self.encoder.cond([text], self.time_ids)[0], (cut[0][1], cut[0][2]) if cut else None)
            self._cache[text] = out
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return out


@dataclass(frozen=True)
class PromptSupport:
    encoder: PromptEncoder | None
    reason: str  # why prompts are (not) accepted, for /v1/model and refusals
    detail: str = ""  # the full cause (may name paths): server log only

    @property
    def accepted(self) -> bool:
        return self.encoder is not None

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "reason": self.reason,
                "max_tokens": None if self.encoder is None else self.encoder.max_length}


NO_PROMPTS = PromptSupport(None, "this model is not a cross-attention model")


def load_prompt_support(spec: str | None, *, cond_tokens: int | None, cond_dim: int | None,
                        time_ids: Tensor | None = None) -> PromptSupport:
    """The text encoder of the pipeline ``spec`` names (an engine's source model spec, a builtin,
    or the folder the UNet was loaded from), checked against the embedding shape the model takes;
    ``time_ids``: the model's default SDXL time ids, packed into an SDXL-class model's rows."""
    from saq_deploy.models import text_encoder as te

    only = "only 'embedding' requests are accepted"
    if not spec:
        return PromptSupport(None, f"the source model of this engine is not recorded: {only}")
    try:
        root = te.pipeline_root(spec)
    except SaqError as e:
        return PromptSupport(None, "this model's pipeline folder has no tokenizer/ and text_encoder/ (an SDXL-"
                             f"class one also tokenizer_2/ and text_encoder_2/), or is not on this server: {only}",
                             str(e))
    try:
        te.require_transformers()
    except SaqError as e:
        return PromptSupport(None, f"this server lacks the 'transformers' package that encodes prompts "
                             f"(pip install 'saq-deploy[text]'): {only}", str(e))
    try:
        enc = PromptEncoder(te.open_text_encoder(root), time_ids)
    except SaqError as e:
        return PromptSupport(None, f"the pipeline's tokenizer / text encoder could not be loaded: {only}", str(e))
    if cond_tokens is not None and enc.max_length != cond_tokens:
        return PromptSupport(None, f"the tokenizer pads prompts to {enc.max_length} tokens but this engine was "
                             f"built for {cond_tokens}: {only}")
    if cond_dim is not None and enc.width != cond_dim:
        return PromptSupport(None, f"the text encoder makes width-{enc.width} states but this model needs "
                             f"{cond_dim}: {only}")
    return PromptSupport(enc, f"prompts are encoded by the pipeline's own text encoder (FP32), padded and "
                         f"truncated to {enc.max_length} tokens")
