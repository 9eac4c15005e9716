"""Container start-up: find or build the engine for this machine, gate it, print its folder.

    python -m saq_deploy.serve.prepare ARTIFACT --backend tensorrt --cache /cache/engines

Engines are not portable: a TensorRT plan is tied to the GPU model and the TensorRT version, an
OpenVINO blob to the CPU and the OpenVINO version, and an ONNX Runtime graph saved at the "all"
level to the CPU and the ORT version. With ``--cache``
the engine lives in ``<cache>/<device>-<runtime><version>-<artifact hash>/``, so a new GPU, a new
image or a new artifact gets its own engine and a restart reuses the right one. Without it, the
engine is the backend's default folder (``<artifact>/engine``, ``engine-tensorrt``, ``engine-openvino``). Concurrent starts on one cache volume
serialize on a lock file. After a build the parity gate runs (``saq-deploy validate``); an engine
that fails it is never served. The engine folder is the last line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from saq_deploy.errors import ConfigError, ModelLoadError, SaqError


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")[:48] or "unknown"


def device_name(backend: str) -> str:
    """GPU model for GPU backends (nvidia-smi, else torch), CPU model for CPU ones."""
    from saq_deploy.backends.registry import get_backend
    from saq_deploy.utils.versions import cpu_model

    spec = get_backend(backend)
    if spec.device == "cuda":
        smi = shutil.which("nvidia-smi")
        if smi:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                     text=True, timeout=20, check=True).stdout.strip().splitlines()
                if out:
                    return out[0]
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        raise ConfigError(f"the {backend} backend needs an NVIDIA GPU and none is visible (nvidia-smi, torch.cuda)")
    return cpu_model()


def runtime_version(backend: str) -> str:
    from saq_deploy.backends.registry import get_backend

    for name in get_backend(backend).distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    raise ConfigError(f"{backend} is not installed in this environment")


def cache_key(backend: str, state_sha256: str, profile: Path | None = None) -> str:
    """``<device>-<runtime><version>-<artifact hash[:16]>[-p<profile hash[:8]>]``."""
    from saq_deploy.backends.registry import get_backend
    from saq_deploy.utils.io import sha256_file

    rt = get_backend(backend).cache_tag
    key = f"{_slug(device_name(backend))}-{rt}{_slug(runtime_version(backend))}-{state_sha256[:16]}"
    return key + (f"-p{sha256_file(profile)[:8]}" if profile else "")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def engine_is_current(engine_dir: Path, state_sha256: str, backend: str) -> bool:
    """An engine folder for this backend, built from this calibration, with intact files."""
    from saq_deploy.backends.engine import read_engine_manifest, verify_files

    try:
        m = read_engine_manifest(engine_dir)
        verify_files(engine_dir, m)
    except ModelLoadError:
        return False
    return m.get("backend") == backend and m.get("source", {}).get("state_sha256") == state_sha256


def prepare_engine(artifact: Path, backend: str, *, cache: Path | None = None, validate: bool = True,
                   profile: Path | None = None, log=None) -> Path:
    """Engine folder for ``artifact`` on this machine: reused if current, else built; then gated."""
    from saq_deploy.api import verify_artifact
    from saq_deploy.backends import build_engine
    from saq_deploy.backends.engine import read_engine_manifest
    from saq_deploy.backends.registry import get_backend
    from saq_deploy.serve.model import check_gate, default_engine_dir

    spec = get_backend(backend)
    state = verify_artifact(artifact)["state_sha256"]
    log = log or logging.getLogger("saq_deploy.serve").info
    if profile is not None and not spec.takes_profile:
        raise ConfigError("--profile (a TensorRT build profile) applies to the tensorrt backend only")
    engine_dir = cache / cache_key(backend, state, profile) if cache else default_engine_dir(artifact, backend)
    with _locked((cache or engine_dir.parent) / f".{engine_dir.name}.lock"):
        if engine_is_current(engine_dir, state, backend):
            log(f"engine: reusing {engine_dir}")
        else:
            log(f"engine: building {backend} engine into {engine_dir} (first start on this machine)")
            build_engine(artifact, backend, output=engine_dir, profile=profile)
        gate = check_gate(engine_dir, read_engine_manifest(engine_dir))
        if not gate.passed and validate:
            log(f"engine: {gate.reason}; running the parity gate")
            cmd = [sys.executable, "-m", "saq_deploy.cli.app", "validate", str(artifact), "--backend", backend,
                   "--engine", str(engine_dir), "--quality-n", "0", "--output", str(engine_dir / "validation")]
            rc = subprocess.run(cmd, check=False, stdout=sys.stderr).returncode
            gate = check_gate(engine_dir, read_engine_manifest(engine_dir))
            if rc != 0 or not gate.passed:
                raise SaqError(f"the {backend} engine did not pass its parity gate ({gate.reason}); "
                               "it will not be served")
        log(f"engine: gate {'passed' if gate.passed else 'NOT passed: ' + gate.reason}")
    return engine_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saq_deploy.serve.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    from saq_deploy.backends.registry import BACKENDS

    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--cache", type=Path, default=None, help="engine cache folder (a volume in containers)")
    p.add_argument("--profile", type=Path, default=None, help="TensorRT build profile (engines/profiles/*.toml)")
    p.add_argument("--no-validate", action="store_true", help="do not run the parity gate after a build")
    p.add_argument("--key-only", action="store_true", help="print the cache key and exit")
    args = p.parse_args(argv)
    try:
        if args.key_only:
            from saq_deploy.api import verify_artifact

            print(cache_key(args.backend, verify_artifact(args.artifact)["state_sha256"], args.profile))
            return 0
        out = prepare_engine(args.artifact, args.backend, cache=args.cache, validate=not args.no_validate,
                             profile=args.profile, log=lambda s: print(s, file=sys.stderr))
    except SaqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
