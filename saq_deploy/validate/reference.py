"""The parity gate's reference: the fake-quant model plus what the engine's exported graph adds.

An engine is built from a Q/DQ graph that can quantize more than the calibrated model does (ONNX
Runtime's placement: INT8 Q/DQ after every conv, export-time scales). Compared with the plain
fake-quant model, those extra roundings read as engine error (measured: ~33 dB per conv output on
a small UNet, 24 of them giving a ~27 dB mean SNR, under the gate's 30 dB, while the engine did
exactly what was exported). So the gate's reference rounds there too, with the scales read from
the graph the engine was built from; the cost of the placement itself (reference vs plain
fake-quant) is reported next to the gate, not hidden: it is deployment error, for the quality
figures (engine vs FP32) to judge."""

from __future__ import annotations

import contextlib
from pathlib import Path


def engine_source_onnx(artifact: Path, engine_manifest: dict) -> tuple[Path | None, str]:
    """The ONNX file the engine was built from, found by its recorded hash: (path or None, why)."""
    from saq_deploy.utils.io import sha256_file

    src = engine_manifest.get("source", {})
    want, recorded = src.get("onnx_sha256"), src.get("onnx")
    cands = []
    if recorded:
        cands.append(Path(artifact) / "onnx" / str(src.get("export_target", "")) / Path(recorded).name)
        cands.append(Path(recorded))
    for p in cands:
        if p.is_file() and want and sha256_file(p) == want:
            return p, f"placement read from {p}"
    return None, ("the ONNX file this engine was built from is not where its manifest says (or changed): "
                  "the reference is the plain fake-quant model")


@contextlib.contextmanager
def placement_reference(fq, artifact: Path, engine_manifest: dict, log=print):
    """Within the context ``fq``'s UNet also rounds what the engine's graph rounds; yields a dict
    saying what was modelled."""
    import onnx

    from saq_deploy.export.placement import read_placement
    from saq_deploy.quant.output_quant import deployed_numerics

    sources = group_sources(artifact, engine_manifest)
    if sources is None:
        path, why = engine_source_onnx(artifact, engine_manifest)
        sources = [path] if path is not None else None
    else:
        path, why = sources[0], f"placement read from the {len(sources)} timestep-group graphs"
    info = {"modelled_outputs": 0, "not_modelled": [], "source": str(path) if path else None, "note": why}
    if sources is None:
        log(f"warning: {why}")
        yield info
        return
    pls = [read_placement(onnx.load(str(p), load_external_data=False)) for p in sources]
    pl = pls[0]
    info["modelled_outputs"], info["not_modelled"] = len(pl.output_scales), pl.not_modelled
    info["modelled_biases"] = len(pl.biases)
    if len(pls) > 1:
        info["timestep_groups"] = len(pls)
    with group_bias_deltas(fq.loaded.unet, pls), deployed_numerics(fq.loaded.unet, pl.output_scales, pl.biases):
        yield info


def group_sources(artifact: Path, engine_manifest: dict) -> list[Path] | None:
    """A grouped engine's source graphs (one per timestep group, found by their recorded hashes),
    or None for a single engine or when any is missing (then the single-graph rule applies)."""
    from saq_deploy.utils.io import sha256_file

    engines = (engine_manifest.get("timestep_groups") or {}).get("engines")
    if not engines:
        return None
    target = str(engine_manifest.get("source", {}).get("export_target", ""))
    out = []
    for e in engines:
        cands = [Path(artifact) / "onnx" / target / Path(e["source_onnx"]).name, Path(e["source_onnx"])]
        found = next((p for p in cands if p.is_file() and sha256_file(p) == e["source_sha256"]), None)
        if found is None:
            return None
        out.append(found)
    return out


@contextlib.contextmanager
def group_bias_deltas(unet, placements: list):
    """Each timestep group's graph stores its INT32 conv biases at its own input scale, so they
    round differently per group: add (group g's bias - group 0's) to the rows of group g (the
    group ids the fake-quant model sets, ``quant.timestep.current_group_ids``). Registered before
    ``deployed_numerics``' output rounding, so the sum is rounded as the engine's conv output is."""
    import numpy as np
    import torch

    from saq_deploy.quant.timestep import current_group_ids

    modules = dict(unet.named_modules())
    handles = []

    def hook_for(delta: torch.Tensor):
        def hook(_m, _inputs, out):
            ids = current_group_ids()
            if ids is None:
                return out
            d = delta.to(out)[ids.to(out.device)]  # (B or 1, C)
            shape = (d.shape[0], d.shape[1], *([1] * (out.dim() - 2))) if out.dim() > 2 else d.shape
            return out + d.reshape(shape)
        return hook

    try:
        for name, b0 in placements[0].biases.items():
            rows = [np.asarray(p.biases.get(name, b0), dtype=np.float32) for p in placements]
            delta = torch.as_tensor(np.stack(rows) - rows[0])
            if name in modules and bool(delta.any()):
                handles.append(modules[name].register_forward_hook(hook_for(delta)))
        yield
    finally:
        for h in handles:
            h.remove()
