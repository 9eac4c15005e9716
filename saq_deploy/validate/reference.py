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

    path, why = engine_source_onnx(artifact, engine_manifest)
    info = {"modelled_outputs": 0, "not_modelled": [], "source": str(path) if path else None, "note": why}
    if path is None:
        log(f"warning: {why}")
        yield info
        return
    pl = read_placement(onnx.load(str(path), load_external_data=False))
    info["modelled_outputs"], info["not_modelled"] = len(pl.output_scales), pl.not_modelled
    info["modelled_biases"] = len(pl.biases)
    with deployed_numerics(fq.loaded.unet, pl.output_scales, pl.biases):
        yield info
