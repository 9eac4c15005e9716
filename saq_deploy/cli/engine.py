"""`saq-deploy export`, `build-engine`, `validate`: calibrated artifact -> Q/DQ ONNX -> engine ->
parity gate. Thin over saq_deploy.export / saq_deploy.backends / saq_deploy.validate."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.backends.registry import BACKENDS
from saq_deploy.export.groups import MODES as GROUP_MODES

# the choices come from the backend registry (saq_deploy.backends.registry): one list of names
Backend = Enum("Backend", {name: name for name in BACKENDS}, type=str)
# build-engine only: "auto" builds the fastest usable backend here (saq_deploy.backends.auto); it is
# a CLI choice, not a backend
BuildBackend = Enum("BuildBackend", {"auto": "auto", **{name: name for name in BACKENDS}}, type=str)


class Target(str, Enum):
    tensorrt = "tensorrt"
    onnxruntime_cpu = "onnxruntime-cpu"


# export --timestep-groups: the modes saq_deploy.export.groups defines
TimestepGroups = Enum("TimestepGroups", {m.replace("-", "_"): m for m in GROUP_MODES}, type=str)


class OptLevel(str, Enum):
    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


ArtifactArg = Annotated[Path, typer.Argument(help="Calibrated artifact folder (from saq-deploy calibrate).")]
BackendOpt = Annotated[Backend, typer.Option("--backend", "-b", case_sensitive=False, help="Engine backend.")]
EngineDirOpt = Annotated[Path | None, typer.Option("--engine", "-e", help="Engine folder (default: the backend's folder in the artifact: engine, engine-tensorrt, engine-openvino).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Only for version-compatible TensorRT plans built by another TensorRT version: load them anyway.")]


def export_cmd(
    artifact: ArtifactArg,
    target: Annotated[list[Target] | None, typer.Option("--target", "-t", case_sensitive=False, help="Placement(s) to export (default: both).")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Seeded samples whose trajectories give the export-time observer inputs.")] = 8,
    timestep_groups: Annotated[TimestepGroups | None, typer.Option("--timestep-groups", case_sensitive=False, help="Artifacts calibrated with K > 1 activation-step groups: per-group (default) also writes one Q/DQ graph per group (model.g{g}.onnx, the same integer weights, that group's activation steps), which build-engine builds into K engines; collapsed writes only model.onnx (each quantizer's largest step).")] = None,
) -> None:
    """Export the calibrated model as Q/DQ ONNX into <artifact>/onnx/<target>/."""
    from saq_deploy.errors import BadOptionError
    from saq_deploy.export.api import default_targets, export_artifact
    from saq_deploy.export.qdq import TARGETS

    if calib_samples < 1:
        raise BadOptionError(f"--calib-samples must be >= 1, got {calib_samples}")
    if target:
        targets = tuple(t.value for t in target)
    else:
        targets = default_targets(artifact)
        if len(targets) < len(TARGETS):
            typer.echo("note: 4-bit activations are not a TensorRT mode; exporting the onnxruntime-cpu placement only",
                       err=True)
    mode = timestep_groups.value if timestep_groups is not None else None
    for t, folder in export_artifact(artifact, targets, n_calib=calib_samples, timestep_groups=mode).items():
        typer.echo(f"wrote {folder}/ ({t})")


def build_engine_cmd(
    artifact: ArtifactArg,
    backend: Annotated[BuildBackend, typer.Option("--backend", "-b", case_sensitive=False, help="Engine backend. auto: TensorRT when it and a CUDA GPU are usable, else the CPU backend (onnxruntime, openvino) that runs this model fastest on this machine, measured (each is built and timed; the loser is removed).")] = BuildBackend.auto,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Engine folder to write (default: <artifact>/engine, engine-tensorrt or engine-openvino).")] = None,
    onnx_file: Annotated[Path | None, typer.Option("--onnx", help="Build from this Q/DQ ONNX instead of the artifact's own export (must have the same inputs).")] = None,
    profile: Annotated[Path | None, typer.Option("--profile", "-p", help="TensorRT build profile (engines/profiles/*.toml).")] = None,
    provider: Annotated[list[str] | None, typer.Option("--provider", help="ONNX Runtime execution provider(s), e.g. CUDAExecutionProvider (default: CPU).")] = None,
    opt_level: Annotated[OptLevel, typer.Option("--opt-level", case_sensitive=False, help="ONNX Runtime graph optimization level ('all' may use CPU-specific layouts; 'extended' is portable).")] = OptLevel.all,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Largest batch per engine call (bigger batches are split).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="OpenVINO: CPU threads the compiled model uses (default: all).")] = None,
) -> None:
    """Build an engine (ONNX Runtime everywhere, OpenVINO on x86 CPUs, TensorRT on NVIDIA GPUs) from a calibrated artifact."""
    from saq_deploy.backends.build import build_engine

    # the export takes minutes: say why build-engine is busy before it starts
    opts = {"onnx_file": onnx_file, "providers": provider, "opt_level": opt_level.value, "max_batch": max_batch,
            "profile": profile, "threads": threads, "note": lambda line: typer.echo(line, err=True)}
    if backend.value == "auto":
        from saq_deploy.backends.auto import pick_backend

        name, out = pick_backend(artifact, output, **opts)
    else:
        name, out = backend.value, build_engine(artifact, backend.value, output, **opts)
    typer.echo(f"wrote {out}/ ({name} engine); next: saq-deploy validate {artifact} --backend {name}")


def validate_cmd(
    artifact: ArtifactArg,
    backend: BackendOpt = Backend.onnxruntime,
    engine: EngineDirOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Seeded samples per sampler for the parity gate.")] = 16,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampling steps of the parity trajectories and the quality run.")] = 10,
    quality_n: Annotated[int, typer.Option("--quality-n", min=0, help="Samples for the quality figures (0 = skip).")] = 200,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report folder (default: <artifact>/validation/<backend>).")] = None,
    force: ForceOpt = False,
) -> None:
    """Parity gate (engine vs fake-quant PyTorch); quality figures only if it passes. Exit 1 on failure."""
    from saq_deploy.validate import validate_engine

    r = validate_engine(artifact, backend.value, engine, n=num_samples, steps=steps, quality_n=quality_n,
                        out_dir=output, log=lambda msg: typer.echo(msg, err=True), force=force)
    m = r["metrics"]
    typer.echo(f"parity {'PASSED' if r['passed'] else 'FAILED'}: median cosine {m['median_cosine']:.6f}, "
               f"SNR mean {m['mean_snr_db']:.1f} dB / p10 {m['p10_snr_db']:.1f} dB, "
               f"final-sample PSNR {m['min_psnr_db']:.1f} dB, max-abs {m['max_abs']:.3g}")
    if not r["passed"]:
        typer.echo("gate failed: " + "; ".join(r["failures"]) + " -- no quality figures reported", err=True)
        typer.echo(f"report: {r['report_dir']}/report.md")
        raise typer.Exit(1)
    q = r.get("quality")
    if q:
        for name in ("fp32", "engine"):
            x = q[name]
            typer.echo(f"{name:>7}: digit-FID {x['digit_fid']:.2f}  IS {x['inception_score']:.2f}  "
                       f"accuracy {x['accuracy']:.3f}")
    typer.echo(f"report: {r['report_dir']}/report.md")


def bench_cmd(
    artifact: ArtifactArg,
    backend: BackendOpt = Backend.onnxruntime,
    engine: EngineDirOpt = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch per UNet call.")] = 8,
    calls: Annotated[int, typer.Option("--calls", min=1, help="Timed calls per variant (after 3 warm-up calls).")] = 20,
    with_engine: Annotated[list[Path] | None, typer.Option("--with-engine", help="Another engine folder of this artifact (any backend) timed in the same interleaved run.")] = None,
    force: ForceOpt = False,
) -> None:
    """Median latency per UNet call: engine vs PyTorch FP32 vs ONNX Runtime FP32, side by side."""
    import os

    # sleeping (not spinning) OpenMP threads: torch and ORT calls alternate here, and spinning
    # threads thrash when anything else shares the cores (set before torch loads libgomp)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from saq_deploy.validate.bench import bench_engine

    r = bench_engine(artifact, backend.value, engine, batch=batch, calls=calls, force=force,
                     others=tuple(with_engine or ()))
    for k, v in r["median_ms"].items():
        typer.echo(f"{k:>36}: {v:8.2f} ms")
    typer.echo(f"engine speed-up: {r['speedup_vs_onnxruntime_fp32']:.2f}x vs ONNX Runtime FP32, "
               f"{r['speedup_vs_pytorch_fp32']:.2f}x vs PyTorch FP32 (batch {batch}, {calls} calls)")


def summary_cmd(artifact: ArtifactArg, backend: BackendOpt = Backend.onnxruntime) -> None:
    """Print parity, quality vs FP32 and speed vs FP32 from validate and bench results."""
    from saq_deploy.validate.bench import summary

    typer.echo(summary(artifact, backend.value))
