"""TensorRT runtime: load checks (pure), the module import, and the runner over torch CUDA tensors.

A plan is tied to the TensorRT version and the GPU that built it (docs/design/deployment.md §2.3), so
``load_runner`` compares the engine manifest with the running TensorRT and GPU first
(:func:`check_compat`) and only then deserializes. ``force`` is for version-compatible plans only:
their embedded lean runtime lets a newer TensorRT run an older plan (forward only), on the same
GPU architecture.

The runner (:class:`TrtRunner`) binds torch CUDA tensors with ``set_input_shape`` /
``set_tensor_address`` and runs ``execute_async_v3`` on its own torch CUDA stream, ordered after
the caller's current stream. Inputs that are already on the GPU are used in place, so a sampling
loop that keeps ``x`` on the GPU makes no host copies. With ``cuda_graph`` one graph is captured
per batch size (fixed shapes) and replayed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from saq_deploy.errors import BackendUnavailableError, ConfigError, ModelLoadError

_LOG = logging.getLogger("saq_deploy.tensorrt")
INSTALL_HINT = ("the TensorRT builder is not on PyPI alone: run inside an NGC TensorRT container "
                "(nvcr.io/nvidia/tensorrt) with pip install -e '.[tensorrt]', or add "
                "--extra-index-url https://pypi.nvidia.com")
# TensorRT DataType member name -> torch dtype (names, never enum integers)
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _where(info: dict) -> str:
    gpu = info.get("gpu") or {}
    return f"TensorRT {info.get('tensorrt')} on {gpu.get('name')} (sm {gpu.get('compute_capability')})"


def check_compat(manifest_build: dict, running: dict, force: bool = False) -> list[str]:
    """Can this machine run the plan? ``manifest_build``: the engine manifest's ``build`` dict;
    ``running``: ``{"tensorrt": version, "gpu": {"name", "compute_capability"}}``.

    Returns notes (empty when everything matches); raises ModelLoadError on a mismatch that
    ``force`` may not override, ConfigError for ``force`` on a plan that is not version-compatible.
    """
    vc = bool((manifest_build.get("flags") or {}).get("version_compatible", False))
    if force and not vc:
        raise ConfigError("--force is only allowed for version-compatible engines (build profile "
                          "build.version_compatible = true); rebuild this engine on this machine instead")
    built_gpu, run_gpu = manifest_build.get("gpu") or {}, running.get("gpu") or {}
    diffs = []
    if str(manifest_build.get("tensorrt")) != str(running.get("tensorrt")):
        diffs.append("TensorRT version")
    if built_gpu.get("name") != run_gpu.get("name"):
        diffs.append("GPU")
    if str(built_gpu.get("compute_capability")) != str(run_gpu.get("compute_capability")):
        diffs.append("compute capability")
    if not diffs:
        return []
    what = (f"engine built with {_where(manifest_build)}, but this machine runs {_where(running)} "
            f"({', '.join(diffs)} differ)")
    if not force:
        hint = " or load it with --force (it is version-compatible)" if vc else ""
        raise ModelLoadError(f"{what}: rebuild it with saq-deploy build-engine --backend tensorrt{hint}")
    if "compute capability" in diffs:
        raise ModelLoadError(f"{what}: version-compatible plans are still tied to the GPU architecture; "
                             "rebuild on this GPU")
    built_v, run_v = version_tuple(manifest_build.get("tensorrt")), version_tuple(running.get("tensorrt"))
    if run_v < built_v:
        raise ModelLoadError(f"{what}: version compatibility is forward only (a newer runtime runs an older "
                             "plan, not the reverse); upgrade TensorRT or rebuild")
    notes = [f"--force: {what}; running the version-compatible plan (host code allowed)"]
    if run_v[:1] != built_v[:1]:
        notes.append("the plan crosses a TensorRT major version; TensorRT refuses it if its lean runtime "
                     "cannot run here")
    return notes


def import_runtime(version_compatible: bool):
    """The ``tensorrt`` module; for version-compatible plans the lean or dispatch runtime will do."""
    names = ("tensorrt", "tensorrt_lean", "tensorrt_dispatch") if version_compatible else ("tensorrt",)
    failures = []
    for name in names:
        try:
            return __import__(name)
        except ImportError as e:
            failures.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise BackendUnavailableError(f"TensorRT is not importable ({'; '.join(failures)}); {INSTALL_HINT}")


def require_cuda() -> int:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch sees none "
                                      "(torch.cuda.is_available() is False)")
    return torch.cuda.current_device()


def gpu_info(device: int | None = None) -> dict:
    device = require_cuda() if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def running_info(trt) -> dict:
    return {"tensorrt": trt.__version__, "gpu": gpu_info()}


def make_logger(trt):
    """A TensorRT ILogger that forwards to Python logging and keeps the errors for messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg))
                _LOG.error(msg)
            elif severity == sev.WARNING:
                _LOG.warning(msg)
            else:
                _LOG.debug(msg)

    return _Logger()


def deserialize(trt, plan: bytes, *, host_code_allowed: bool, logger=None):
    """``(runtime, engine)`` from plan bytes; version-compatible plans need host code allowed."""
    logger = logger or make_logger(trt)
    runtime = trt.Runtime(logger)
    if host_code_allowed:
        if not hasattr(runtime, "engine_host_code_allowed"):
            raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot run version-compatible plans "
                                          "(no engine_host_code_allowed)")
        runtime.engine_host_code_allowed = True  # load trusted plans only
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        detail = "; ".join(getattr(logger, "errors", [])[-3:]) or "see the TensorRT log"
        raise ModelLoadError(f"TensorRT could not deserialize the plan: {detail}")
    return runtime, engine


class TrtRunner:
    """``run(feeds, out_shape) -> Tensor`` over one TensorRT execution context (one optimization
    profile). ``device`` tells EngineEpsModel to hand over GPU tensors without host copies."""

    def __init__(self, plan_path: Path, trt, *, host_code_allowed: bool = False, cuda_graph: bool = False):
        self.device = torch.device("cuda", require_cuda())
        self.trt = trt
        self.logger = make_logger(trt)
        self.runtime, self.engine = deserialize(trt, Path(plan_path).read_bytes(),
                                                host_code_allowed=host_code_allowed, logger=self.logger)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ModelLoadError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        outs = [n for n in names if not is_in[n]]
        if len(outs) != 1:
            raise ModelLoadError(f"expected one engine output (eps), found {outs}")
        self.output_name = outs[0]
        self.dtypes = {n: self._torch_dtype(n) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.stream = torch.cuda.Stream(device=self.device)
        self.cuda_graph = cuda_graph
        self._graphs: dict[int, tuple] = {}  # batch -> (graph, static inputs, static output)

    def _torch_dtype(self, name: str) -> torch.dtype:
        dt = self.engine.get_tensor_dtype(name)
        key = getattr(dt, "name", str(dt).split(".")[-1])
        if key not in _TORCH_DTYPES:
            raise ModelLoadError(f"engine tensor '{name}' has TensorRT type {key}, which has no torch equivalent")
        return _TORCH_DTYPES[key]

    def _inputs(self, feeds: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """Feeds on the GPU in the engine's dtypes, padded up to the profile's minimum batch."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ConfigError(f"missing engine inputs {missing}")
        out = {}
        for n in self.input_names:
            t = feeds[n].to(device=self.device, dtype=self.dtypes[n], non_blocking=True)
            if batch < self.min_batch:  # repeat the last row; the padded outputs are dropped
                t = torch.cat([t, t[-1:].expand(self.min_batch - batch, *t.shape[1:])])
            out[n] = t.contiguous()
        return out

    def _bind(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for n, t in inputs.items():
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ConfigError(f"input '{n}' shape {tuple(t.shape)} is outside the engine's optimization "
                                  f"profile (batch {self.min_batch}..{self.max_batch})")
            self.context.set_tensor_address(n, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=self.dtypes[self.output_name], device=self.device)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            detail = "; ".join(self.logger.errors[-3:]) or "see the TensorRT log"
            raise ModelLoadError(f"TensorRT execution failed: {detail}")

    def _run_direct(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Inputs and output live on the caller's stream; the engine's stream waits for them and the
        # caller waits for the engine, so nothing is freed or read before the engine is done.
        caller = torch.cuda.current_stream(self.device)
        out = self._bind(inputs)
        self.stream.wait_stream(caller)
        self._execute()
        caller.wait_stream(self.stream)
        return out

    def _run_graph(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        b = next(iter(inputs.values())).shape[0]
        if b not in self._graphs:
            static = {n: t.clone() for n, t in inputs.items()}
            out = self._bind(static)  # static buffers, kept with the graph
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._execute()  # one run after the shape change, before capture (TensorRT docs)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._execute()
            self._graphs[b] = (graph, static, out)
        graph, static, out = self._graphs[b]
        for n, t in inputs.items():
            static[n].copy_(t)
        graph.replay()  # on the current stream, after the copies
        return out.clone()  # the static output is overwritten by the next replay

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        on_gpu = feeds["sample"].is_cuda
        batch = int(feeds["sample"].shape[0])
        if batch > self.max_batch:
            raise ConfigError(f"batch {batch} exceeds the engine's maximum {self.max_batch}: rebuild with a "
                              "larger batch.max in the build profile")
        inputs = self._inputs(feeds, batch)
        out = self._run_graph(inputs) if self.cuda_graph else self._run_direct(inputs)
        out = out[:batch].float()
        if tuple(out.shape) != tuple(out_shape):
            raise ModelLoadError(f"engine output shape {tuple(out.shape)} != expected {tuple(out_shape)}")
        return out if on_gpu else out.cpu()

    def close(self) -> None:
        """Free the CUDA graphs, then the context before the engine before the runtime (TensorRT's order)."""
        self._graphs.clear()
        self.context = None
        self.engine = None
        self.runtime = None


def load_runner(path: Path, manifest: dict, force: bool = False) -> TrtRunner:
    """Check the manifest against this machine, then open the plan."""
    build = manifest.get("build") or {}
    vc = bool((build.get("flags") or {}).get("version_compatible", False))
    trt = import_runtime(vc)
    for note in check_compat(build, running_info(trt), force):
        _LOG.warning(note)
    runtime_opts = ((build.get("profile") or {}).get("resolved") or {})
    return TrtRunner(Path(path) / manifest["engine_file"], trt, host_code_allowed=vc,
                     cuda_graph=bool(runtime_opts.get("cuda_graph", False)))
