"""`saq-deploy models` and `saq-deploy env`."""

from __future__ import annotations

import typer


def models_cmd() -> None:
    """List built-in models and how to load your own diffusers UNet."""
    from rich.console import Console
    from rich.table import Table

    from saq_deploy.models.loading import BUILTINS, builtin_dir

    table = Table(title="Built-in models")
    for col in ("name", "description", "weights"):
        table.add_column(col)
    for name, desc in BUILTINS.items():
        d = builtin_dir(name)
        table.add_row(f"builtin:{name}", desc, str(d) if d.exists() else "(missing: run make reference)")
    console = Console()
    console.print(table)
    console.print(
        "Your own model: --model PATH, where PATH is a diffusers UNet folder (config.json + "
        "diffusion_pytorch_model.safetensors; UNet2DModel or UNet2DConditionModel) with "
        "scheduler_config.json beside it or in ../scheduler/, or a whole pipeline folder "
        "(model_index.json, unet/, scheduler/). Nothing is downloaded."
    )


def env_cmd() -> None:
    """Versions, available backends and GPUs."""
    import platform

    import torch

    from saq_deploy.utils.versions import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name:18s} {ver or '-'}")
    typer.echo(f"{'platform':18s} {platform.platform()} ({torch.get_num_threads()} torch threads)")
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    typer.echo(f"{'cuda gpu':18s} {gpu}")
    try:
        import onnxruntime as ort

        providers = ", ".join(ort.get_available_providers())
    except ImportError:
        providers = "onnxruntime not installed"
    typer.echo(f"{'ort providers':18s} {providers}")
    typer.echo(f"{'tensorrt builder':18s} {_tensorrt_status()}")


def _tensorrt_status() -> str:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "not installed (TensorRT engines need an NGC container or NVIDIA's index)"
    try:
        import tensorrt as trt

        return f"tensorrt {trt.__version__}"
    except Exception as e:  # noqa: BLE001 -- the PyPI stub or missing CUDA libs fail in many ways
        return f"installed but not importable ({type(e).__name__})"
