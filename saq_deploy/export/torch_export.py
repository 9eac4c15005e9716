"""Export the FP diffusers UNet to ONNX (the graph our Q/DQ pass then annotates).

The legacy TorchScript exporter (``dynamo=False``, passed explicitly: torch >= 2.9 defaults to
dynamo) is used because it is fast (~1 s vs ~20 s), keeps every node's module scope in its name
(``/unet/down_blocks.1/attentions.0/to_q/MatMul``), which is how the Q/DQ pass finds the node of
each quantized layer, and because ModelOpt-style INT4 graphs raise the opset afterwards anyway.

Inputs: ``sample`` (B, C, H, W) float32, ``timestep`` (B,) float32 (1-D: a scalar would be baked
in by tracing), then ``class_labels`` (B,) int64 for class-conditional UNets or
``encoder_hidden_states`` (B, L, D) float32 for cross-attention UNets, and for SDXL-class ones
(``addition_embed_type="text_time"``) also ``text_embeds`` (B, E) and ``time_ids`` (B, 6) float32,
the packed cond's tail (``models.eps_model.AddedCond``) as separate inputs, as diffusers and
TensorRT's SDXL demos name them. Output: ``eps``. The batch is dynamic; H and W are fixed to the
model's sample size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from saq_deploy.models.eps_model import TIME_IDS, AddedCond

EXPORT_OPSET = 20  # the legacy exporter's maximum; INT4 graphs are raised to 21 by the Q/DQ pass
SCOPE_PREFIX = "/unet/"


class _UNetForExport(torch.nn.Module):
    """Positional inputs and a plain tensor output, so the exported graph has stable names."""

    def __init__(self, unet: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.unet = unet
        self.kind = kind

    def forward(self, sample, timestep, cond=None, text_embeds=None, time_ids=None):
        if self.kind == "text":
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states=cond, added_cond_kwargs=added,
                             return_dict=False)[0]
        return self.unet(sample, timestep, class_labels=cond, return_dict=False)[0]


def input_specs(kind: str, sample_shape: tuple[int, ...], cond_shape: tuple[int, int] | None = None,
                added: AddedCond | None = None) -> list[dict]:
    """Name, dtype and shape (``"B"`` = dynamic batch) of each graph input; ``cond_shape``: the
    cond's (L [+ added.rows], D), packed with ``added`` for an SDXL-class UNet."""
    specs = [{"name": "sample", "dtype": "float32", "shape": ["B", *sample_shape]},
             {"name": "timestep", "dtype": "float32", "shape": ["B"]}]
    if kind == "class":
        specs.append({"name": "class_labels", "dtype": "int64", "shape": ["B"]})
    elif kind == "text":
        if cond_shape is None:
            raise ValueError("a cross-attention UNet needs cond_shape=(L, D)")
        length, width = cond_shape
        length -= 0 if added is None else added.rows
        specs.append({"name": "encoder_hidden_states", "dtype": "float32", "shape": ["B", length, width]})
        if added is not None:
            specs += [{"name": "text_embeds", "dtype": "float32", "shape": ["B", added.text_embeds]},
                      {"name": "time_ids", "dtype": "float32", "shape": ["B", TIME_IDS]}]
    return specs


def example_inputs(specs: list[dict], batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in specs:
        shape = [batch if d == "B" else d for d in s["shape"]]
        if s["name"] == "timestep":
            out[s["name"]] = torch.linspace(10.0, 900.0, batch)
        elif s["name"] == "time_ids":  # pixel sizes: what a real call feeds, not noise
            out[s["name"]] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).expand(batch, -1)
        elif s["dtype"] == "int64":
            out[s["name"]] = torch.arange(batch, dtype=torch.long) % 2
        else:
            out[s["name"]] = torch.randn(shape, generator=g)
    return out


def export_unet_onnx(unet: torch.nn.Module, kind: str, sample_shape: tuple[int, ...], path: Path, *,
                     cond_shape: tuple[int, int] | None = None, opset: int = EXPORT_OPSET) -> list[dict]:
    """Write the FP32 UNet as ONNX to ``path``; returns the input specs."""
    specs = input_specs(kind, sample_shape, cond_shape, AddedCond.of(unet.config) if kind == "text" else None)
    inputs = example_inputs(specs)
    names = [s["name"] for s in specs]
    dynamic = {n: {0: "B"} for n in names} | {"eps": {0: "B"}}
    wrapper = _UNetForExport(unet, kind).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about diffusers' shape asserts
        torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(path), dynamo=False,
                          opset_version=opset, input_names=names, output_names=["eps"],
                          dynamic_axes=dynamic, do_constant_folding=True)
    return specs


def module_scope(node_name: str) -> str | None:
    """``/unet/down_blocks.1/attentions.0/to_q/MatMul`` -> ``down_blocks.1.attentions.0.to_q``."""
    if not node_name.startswith(SCOPE_PREFIX):
        return None
    parts = node_name[len(SCOPE_PREFIX):].split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else None
