"""Package versions for manifests and `saq-deploy env`, read from metadata (imports nothing heavy)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("saq-deploy", "torch", "diffusers", "numpy", "safetensors", "onnx", "onnxruntime",
            "onnxruntime-gpu", "tensorrt", "polygraphy", "nvidia-modelopt", "typer", "scikit-learn")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
