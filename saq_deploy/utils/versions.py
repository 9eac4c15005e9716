"""Package versions for manifests and `saq-deploy env`, read from metadata (imports nothing heavy)."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("saq-deploy", "torch", "diffusers", "numpy", "safetensors", "onnx", "onnxruntime",
            "onnxruntime-gpu", "openvino", "tensorrt", "polygraphy", "nvidia-modelopt", "typer", "scikit-learn")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU model string (``/proc/cpuinfo`` "model name", else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
