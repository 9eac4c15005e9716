"""OpenVINO backend (CPU plugin, optional extra ``[openvino]``): compile the calibrated Q/DQ ONNX,
save the compiled blob, run it under the ``eps`` contract. OpenVINO is imported lazily.

    <artifact>/engine-openvino/
      model.blob       ``compiled.export_model()``: the model after OpenVINO's low-precision
                       transformations (Q/DQ pairs folded into INT8 Convolution / FullyConnected),
                       tied to the OpenVINO version and the CPU (its header names both)
      manifest.json    build: OpenVINO version, CPU model + ISA capabilities, the placement it
                       consumed, the inference precision hint, and the precisions the compiled
                       model actually runs (layers counted from ``get_runtime_model()``)

The precision hint is f32: on CPUs with BF16 the plugin would otherwise run every layer that is
not INT8 in bfloat16, which is not what the fake-quant model (the parity reference) computes.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from saq_deploy.errors import BackendUnavailableError, ModelLoadError

INSTALL_HINT = "pip install 'saq-deploy[openvino]'"
BLOB_FILE = "model.blob"
DEVICE = "CPU"
PRECISION_HINT = "f32"
# layer types that do the arithmetic (the rest move, reshape or normalize data)
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm")
_SKIP_LAYERS = ("Const", "Input", "Output", "Parameter", "Result")
_INT8 = ("i8", "u8")
_INT4 = ("i4", "u4")  # blocked INT4 GEMM weights (W4A8 artifacts)
_FP32 = ("f32",)


def require_openvino():
    """The ``openvino`` module, or one line naming the extra to install."""
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailableError(f"the openvino backend needs OpenVINO, which is not installed here: "
                                      f"{INSTALL_HINT}") from e
    return ov


def one_line(exc: BaseException) -> str:
    """OpenVINO's message without its source-location preamble ("Exception from src/...",
    "Check '...' failed at ..."), on one line."""
    keep = [ln.strip() for ln in str(exc).splitlines()
            if ln.strip() and not ln.startswith("Exception from ") and not ln.startswith("Check '")]
    text = " ".join(keep) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def cpu_info(core) -> dict:
    from saq_deploy.utils.versions import cpu_model

    caps = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    return {"model": cpu_model(), "device_name": str(core.get_property(DEVICE, "FULL_DEVICE_NAME")),
            "capabilities": sorted(str(c) for c in caps)}


def running_info() -> dict:
    ov = require_openvino()
    return {"openvino": ov.get_version(), "cpu": cpu_info(ov.Core())}


def _config(threads: int | None) -> dict:
    cfg: dict = {"INFERENCE_PRECISION_HINT": PRECISION_HINT}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def runtime_precisions(compiled) -> dict:
    """What the compiled model runs: layers by runtime precision (INT8 = i8/u8, INT4 = i4/u4), over all
    executable layers and over the compute layers (convolutions, matmuls), plus per layer type."""
    by_type: dict[str, Counter] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in _SKIP_LAYERS:
            continue
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
        by_type.setdefault(kind, Counter())[prec] += 1

    def split(kinds) -> dict:
        c = sum((by_type[k] for k in kinds if k in by_type), Counter())
        return {"int8": sum(c[p] for p in _INT8), "int4": sum(c[p] for p in _INT4),
                "fp32": sum(c[p] for p in _FP32),
                "other": {p: n for p, n in sorted(c.items()) if p not in _INT8 + _INT4 + _FP32}}

    return {"layers": split(by_type), "compute_layers": split(COMPUTE_LAYERS),
            "by_type": {k: dict(sorted(v.items())) for k, v in sorted(by_type.items())}}


def compile_blob(src: Path | bytes, tmp: Path, placement: str, *, threads: int | None = None,
                 shown: Path | None = None) -> tuple[dict, dict, str]:
    """Compile ``src`` (Q/DQ ``placement``) with the CPU plugin and write ``tmp/model.blob``;
    returns (files, build, file). ``shown``: the graph to name in errors (``src`` may be a copy)."""
    from saq_deploy.utils.io import sha256_file, write_bytes_atomic

    ov = require_openvino()
    core = ov.Core()
    t0 = time.perf_counter()
    try:
        import io

        graph = io.BytesIO(src) if isinstance(src, bytes) else str(src)  # bytes: an in-memory rewrite
        compiled = core.compile_model(core.read_model(graph), DEVICE, _config(threads))
    except RuntimeError as e:  # the frontend and the plugin both raise RuntimeError
        raise ModelLoadError(f"OpenVINO could not compile '{shown or src}' for {DEVICE}: {one_line(e)}") from e
    seconds = time.perf_counter() - t0
    write_bytes_atomic(tmp / BLOB_FILE, compiled.export_model().getvalue())
    build = {"openvino": ov.get_version(), "device": DEVICE, "cpu": cpu_info(core),
             "placement": placement, "inference_precision_hint": PRECISION_HINT,
             "precisions": runtime_precisions(compiled), "build_time_s": round(seconds, 3)}
    return {BLOB_FILE: sha256_file(tmp / BLOB_FILE)}, build, BLOB_FILE


def check_compat(path: Path, build: dict, running: dict | None = None) -> None:
    """A compiled blob runs only on the OpenVINO version and CPU it was compiled for: one line
    (what differs, and: rebuild) otherwise."""
    running = running or running_info()
    diffs = []
    if str(build.get("openvino")) != str(running["openvino"]):
        diffs.append(f"OpenVINO {build.get('openvino')} vs {running['openvino']} here")
    built_cpu, run_cpu = build.get("cpu") or {}, running["cpu"]
    if built_cpu.get("model") != run_cpu["model"]:
        diffs.append(f"CPU '{built_cpu.get('model')}' vs '{run_cpu['model']}' here")
    elif built_cpu.get("capabilities") != run_cpu["capabilities"]:
        diffs.append(f"CPU capabilities {built_cpu.get('capabilities')} vs {run_cpu['capabilities']} here")
    if diffs:
        raise ModelLoadError(f"OpenVINO engine '{path}' was compiled for another machine ({'; '.join(diffs)}): "
                             "rebuild it here with saq-deploy build-engine --backend openvino")


class OvRunner:
    """``run(feeds, out_shape) -> Tensor`` over one infer request of the imported blob."""

    def __init__(self, blob_path: Path, build: dict, *, threads: int | None = None):
        ov = require_openvino()
        core = ov.Core()
        # the plugin re-applies the config at import: the precision hint must be given again
        cfg = _config(threads)
        cfg["INFERENCE_PRECISION_HINT"] = build.get("inference_precision_hint", PRECISION_HINT)
        # unpinned threads, like ONNX Runtime's: pinned ones stall when other processes share the cores
        cfg["ENABLE_CPU_PINNING"] = False
        try:
            self.compiled = core.import_model(Path(blob_path).read_bytes(), DEVICE, cfg)
        except RuntimeError as e:
            raise ModelLoadError(f"OpenVINO could not load '{blob_path}': {one_line(e)}; rebuild it with "
                                 "saq-deploy build-engine --backend openvino") from e
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        inputs = {n: feeds[n].detach().contiguous().numpy() for n in self.input_names}
        self.request.infer(inputs)
        out = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        if tuple(out.shape) != tuple(out_shape):
            raise ModelLoadError(f"engine output shape {tuple(out.shape)} != expected {tuple(out_shape)}")
        return out

    def close(self) -> None:
        self.request = None
        self.compiled = None
