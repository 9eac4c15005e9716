"""``build_engine``: calibrated artifact -> engine folder for a backend.

The artifact's Q/DQ ONNX export for the backend's target is made on demand (and re-made when
it no longer matches the calibrated state). Every engine manifest carries the parity thresholds
``validate`` enforces, so an engine and its gate travel together.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from saq_deploy.backends.grouped import build_groups, is_grouped
from saq_deploy.backends.registry import get_backend
from saq_deploy.errors import BadOptionError, ConfigError, ModelLoadError

# Engine vs fake-quant PyTorch on the same inputs along real trajectories. Torch and ORT round
# differently at x.5 boundaries, and one flipped INT8 code moves a value by a full step, so a deep
# net's outputs diverge statistically, not bit-wise (docs/design/deployment.md §5). The divergence
# concentrates in the last call (t ~ 0, where eps is ill-conditioned and barely moves the
# sample), so the gate uses the median, mean and 10th percentile over calls, not the worst call, plus
# the end-to-end PSNR of final samples. The bounds sit well below the quantization error itself
# (fake-quant vs FP32), so a structural bug (wrong scale, transposed weight, missing Q/DQ: SNR
# < 15 dB) cannot pass, while rounding flips (~35-38 dB on the reference model) do. Negative
# controls: scales 2x in one block or per-channel scales shifted by one channel fail; a single
# conv's scales off by 30% stay inside the flip noise and pass (quality shows it instead).
# Measured figures: docs/results/parity.md.
DEFAULT_PARITY = {
    "min_median_cosine": 0.999,
    "min_p10_snr_db": 28.0,
    "min_mean_snr_db": 30.0,
    "min_psnr_db": 32.0,  # final samples, engine vs fake-quant, same seeds (range [-1, 1])
}
# 4-bit activations: a rounding flip moves a value by 1/16 of the range instead of 1/256
PARITY_4BIT_ACTS = {"min_median_cosine": 0.995, "min_p10_snr_db": 18.0, "min_mean_snr_db": 22.0, "min_psnr_db": 22.0}


def default_parity(bits: str | None) -> dict:
    return dict(PARITY_4BIT_ACTS if (bits or "").lower().endswith("a4") else DEFAULT_PARITY)


def ensure_export(artifact: Path, target: str, note: Callable[[str], None] | None = None,
                  state: str | None = None) -> Path:
    """The artifact's export folder for ``target``, (re)exported if missing or stale; ``note`` hears
    why an export starts (it takes minutes), after the artifact verified. ``state``: its verified
    state hash, if the caller already re-hashed the state."""
    from saq_deploy.calibrate.artifact import verify_artifact
    from saq_deploy.export.api import EXPORT_DIR, MANIFEST_FILE, export_artifact
    from saq_deploy.utils.io import sha256_file

    # re-hash the state itself: a cached export must not vouch for a state that changed since
    state = state or verify_artifact(artifact)["state_sha256"]
    folder = artifact / EXPORT_DIR / target
    mf = folder / MANIFEST_FILE
    if mf.exists():
        m = json.loads(mf.read_text())
        fresh = m.get("calibrated", {}).get("state_sha256") == state and all(
            (folder / f).exists() and sha256_file(folder / f) == h for f, h in m.get("files", {}).items())
        if fresh:
            return folder
    if note is not None:
        why = "is stale (the artifact changed since)" if mf.exists() else "does not exist"
        note(f"the ONNX export for {target} in {artifact} {why}; exporting it now")
    return export_artifact(artifact, (target,))[target]


def check_onnx_inputs(path: Path, specs: list[dict]) -> None:
    """An ONNX file must be ONNX and have the inputs the export manifest names."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for non-ONNX bytes
        raise ModelLoadError(f"'{path}' is not an ONNX model ({type(e).__name__}); pass a .onnx file "
                             "from saq-deploy export") from e
    have = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    want = {s["name"] for s in specs}
    if have != want:
        raise ModelLoadError(f"'{path}' has inputs {sorted(have)} but this model needs {sorted(want)}; "
                             "export it with saq-deploy export")


def build_engine(artifact: str | Path, backend: str = "onnxruntime", output: str | Path | None = None, *,
                 onnx_file: str | Path | None = None, providers: list[str] | None = None, opt_level: str = "all",
                 max_batch: int | None = None, profile: str | Path | None = None, parity: dict | None = None,
                 threads: int | None = None, note: Callable[[str], None] | None = None) -> Path:
    """Build the engine folder; returns its path (default: the backend's
    ``default_engine_dir``, e.g. ``<artifact>/engine`` for ONNX Runtime, ``<artifact>/engine-tensorrt``
    for TensorRT, whose ``profile`` is a build-profile TOML). ``note`` hears when an export has to
    run first and which leftovers of a killed build it removed."""
    from saq_deploy.calibrate.artifact import verify_artifact

    spec = get_backend(backend)
    artifact = Path(artifact)
    am = verify_artifact(artifact)  # bits (thresholds) come from the verified manifest
    if max_batch is not None and max_batch < 1:
        raise BadOptionError(f"--max-batch must be >= 1, got {max_batch}")
    if profile is not None and not spec.takes_profile:  # was silently ignored
        raise BadOptionError(f"--profile (a TensorRT build profile) does not apply to --backend {spec.name}")
    ctx = spec.preflight(profile=profile, max_batch=max_batch)  # before any (slow) export
    export_dir = ensure_export(artifact, spec.export_target(am), note, state=am["state_sha256"])
    em = json.loads((export_dir / "manifest.json").read_text())
    src = Path(onnx_file) if onnx_file else spec.source_onnx(export_dir, ctx)
    if not src.exists():
        raise ModelLoadError(f"ONNX file '{src}' does not exist")
    check_onnx_inputs(src, em["inputs"])
    out = Path(output) if output else spec.default_engine_dir(artifact)
    _refuse_foreign_output(out)  # before the (slow) build: a user's file or folder is never replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    from saq_deploy.utils.io import owned_temp_prefix, remove_stale_temps

    # a build killed mid-way (kill -9, power cut: no cleanup ran) leaves its temp folders here
    remove_stale_temps(out.parent, (f".{out.name}-", f".{out.name}-old-"), "an interrupted build-engine", note)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=owned_temp_prefix(f".{out.name}-")))
    try:
        kw = {"providers": providers, "opt_level": opt_level, "threads": threads}
        groups = None
        if onnx_file is None and is_grouped(em):  # one engine per timestep group (backends/grouped.py)
            built, groups = build_groups(spec, src, tmp, export_dir, em, ctx, **kw)
            src = Path(groups["engines"][0]["source_onnx"])
        else:
            built = spec.build(src, tmp, export_dir, em, ctx, **kw)
        _write_manifest(tmp, backend, built.engine_file, built.files, built.build, am, em, export_dir, src,
                        max_batch or built.max_batch, parity or default_parity(am.get("bits")), groups)
        _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from saq_deploy.utils.io import name_intended

        raise name_intended(e, tmp, out)  # "no space left ... while writing <out>/model.onnx"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_manifest(tmp: Path, backend: str, engine_file: str, files: dict, build: dict, am: dict, em: dict,
                    export_dir: Path, src: Path, max_batch: int | None, parity: dict, groups: dict | None) -> None:
    from saq_deploy.utils.io import seal_manifest, sha256_file, write_json_atomic
    from saq_deploy.utils.versions import package_versions

    write_json_atomic(tmp / "manifest.json", seal_manifest({
        "artifact": "saq-deploy-engine", "backend": backend, "engine_file": engine_file, "files": files,
        "build": build, "inputs": em["inputs"], "outputs": em["outputs"],
        "shapes": {"sample": em["inputs"][0]["shape"][1:], "max_batch": max_batch},
        "source": {"onnx": str(src), "onnx_sha256": sha256_file(src), "export_dir": str(export_dir),
                   "export_target": em["target"], "state_sha256": am["state_sha256"],
                   "model_spec": am["model"]["spec"], "model_hash": am["model"]["hash"],
                   "method": am["method"], "bits": am["bits"]},
        "model_meta": em["model_meta"], "qdq": {"not_represented": em["qdq"]["not_represented"],
                                                "weight_formats": em["qdq"]["weight_formats"]},
        "parity": parity, "versions": package_versions(), **({"timestep_groups": groups} if groups else {}),
    }))


def _refuse_foreign_output(out: Path) -> None:
    """An existing ``out`` may only be an engine folder this tool wrote (it is then rebuilt)."""
    if not out.exists() and not out.is_symlink():
        return
    what = "a file" if not out.is_dir() else "a folder that is not a saq-deploy engine (no engine manifest.json)"
    if out.is_dir() and not out.is_symlink():
        try:
            if json.loads((out / "manifest.json").read_text()).get("artifact") == "saq-deploy-engine":
                return
        except (OSError, ValueError, AttributeError):
            pass
    raise ConfigError(f"output '{out}' exists and is {what}; it is left untouched: "
                      "choose another -o or remove it yourself")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished temp folder onto ``out`` (an old engine is removed only after)."""
    from saq_deploy.utils.io import publish_mode

    publish_mode(tmp)  # mkdtemp made it 0700; the engine folder gets the user's usual mode
    if out.exists():
        from saq_deploy.utils.io import owned_temp_prefix

        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=owned_temp_prefix(f".{out.name}-old-")))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
