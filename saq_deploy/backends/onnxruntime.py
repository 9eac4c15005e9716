"""ONNX Runtime backend: build (save ORT's optimized graph + manifest) and run (IO binding).

The "engine" is the graph ONNX Runtime produced after its optimizations (QDQ fusion into
QLinearConv / MatMulIntegerToFloat, layout transforms) saved with ``optimized_model_filepath``;
loading it skips the optimizers. Built with ORT_ENABLE_ALL it may hold CPU-specific layouts, so
the manifest records the machine; ``opt_level="extended"`` builds a portable one.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from saq_deploy.errors import BackendUnavailableError, ConfigError, ModelLoadError

OPT_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# Config key that sets MatMulNBits' accuracy level: 0 keeps activations FP32 (parity), 4 = int8 (speed)
NBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
    return ort


def _level(ort, name: str):
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ConfigError(f"unknown optimization level '{name}'; choose one of {', '.join(OPT_LEVELS)}")
    return levels[name]


def resolve_providers(providers: list[str] | tuple[str, ...] | None) -> list[str]:
    """Requested providers that this onnxruntime build has (CPU always last as the fallback)."""
    ort = _ort()
    available = ort.get_available_providers()
    if not providers:
        return list(DEFAULT_PROVIDERS)
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendUnavailableError(f"execution provider(s) {missing} are not in this onnxruntime build "
                                      f"(available: {', '.join(available)})")
    return [*providers, *(["CPUExecutionProvider"] if "CPUExecutionProvider" not in providers else [])]


def session_options(*, opt_level: str = "all", threads: int | None = None, optimized_path: Path | None = None,
                    nbits_accuracy: int = 0, spinning: bool = True):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = _level(ort, opt_level)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.add_session_config_entry(NBITS_ACCURACY_KEY, str(nbits_accuracy))
    if not spinning:  # idle ORT threads stop busy-waiting (fair when sharing cores with torch)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def optimize_model(onnx_path: Path | bytes, out_path: Path, *, opt_level: str = "all", providers=None,
                   disabled_optimizers: tuple[str, ...] = (), nbits_accuracy: int = 0,
                   shown: Path | None = None) -> dict:
    """Let ONNX Runtime optimize ``onnx_path`` (a file, or a serialized graph: then ``shown`` names
    it in errors) and save the result to ``out_path``."""
    ort = _ort()
    provs = resolve_providers(providers)
    t0 = time.perf_counter()
    so = session_options(opt_level=opt_level, optimized_path=out_path, nbits_accuracy=nbits_accuracy)
    try:
        src = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
        ort.InferenceSession(src, so, providers=provs, disabled_optimizers=list(disabled_optimizers))
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        if "serialization failed" in str(e).lower():  # writing out_path failed, not reading the source
            raise _write_error(out_path, e) from e
        raise ModelLoadError(f"ONNX Runtime could not build '{shown or onnx_path}': {str(e).splitlines()[0]}") from e
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise ModelLoadError(f"ONNX Runtime did not write its optimized graph to '{out_path}'")
    return {"onnxruntime": ort.__version__, "providers": provs, "graph_optimization_level": opt_level,
            "disabled_optimizers": list(disabled_optimizers), "matmulnbits_accuracy_level": nbits_accuracy,
            "build_time_s": round(time.perf_counter() - t0, 3),
            "machine": {"processor": platform.processor() or platform.machine(), "system": platform.system()}}


def _write_error(path: Path, exc: Exception) -> Exception:
    """ORT reports a failed write of the optimized graph (disk full, file size limit) only as
    INVALID_PROTOBUF "serialization failed", which reads like a broken source model. Writing more
    to the same partial file makes the kernel say what happened (ENOSPC, EFBIG, EDQUOT); the file
    is temp output, removed here."""
    import errno
    import os

    try:
        with open(path, "ab") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())  # delayed allocation: a full disk may only show at fsync
    except OSError as e:
        return OSError(e.errno, os.strerror(e.errno or errno.EIO), str(path))
    finally:
        path.unlink(missing_ok=True)
    return ModelLoadError(f"ONNX Runtime could not write its optimized graph to '{path}' "
                          f"({str(exc).splitlines()[0]}); check that folder is writable and has space")


class OrtRunner:
    """Runs an (optimized) ONNX graph with IO binding over torch CPU tensors: inputs are bound
    in place and the output lands in a preallocated tensor, so no extra copies per call."""

    def __init__(self, model_path: Path, *, providers=None, threads: int | None = None,
                 opt_level: str = "disable", disabled_optimizers: tuple[str, ...] = (), nbits_accuracy: int = 0,
                 spinning: bool = True):
        ort = _ort()
        self.providers = resolve_providers(providers)
        so = session_options(opt_level=opt_level, threads=threads, nbits_accuracy=nbits_accuracy, spinning=spinning)
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=self.providers,
                                                disabled_optimizers=list(disabled_optimizers))
        except Exception as e:
            raise ModelLoadError(f"ONNX Runtime could not load '{model_path}': {str(e).splitlines()[0]}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        io = self.session.io_binding()
        dtypes = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16}
        keep = []  # contiguous copies must outlive the run
        for name in self.input_names:
            t = feeds[name].contiguous()
            keep.append(t)
            io.bind_input(name, "cpu", 0, dtypes[t.dtype], list(t.shape), t.data_ptr())
        out = torch.empty(out_shape, dtype=torch.float32)
        io.bind_output(self.output_name, "cpu", 0, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(io)
        return out

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], feeds)[0]

    def close(self) -> None:
        self.session = None  # ORT frees the session (and its arena) with the last reference
