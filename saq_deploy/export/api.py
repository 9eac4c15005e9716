"""``export_artifact``: calibrated artifact -> Q/DQ ONNX per target, stored inside the artifact.

    runs/x/onnx/tensorrt/          model.onnx (FP32-typed), model.fp16.onnx (FP16-typed, for
                                   strongly typed TensorRT builds), manifest.json
    runs/x/onnx/onnxruntime-cpu/   model.onnx (FP32-typed, fuses to QLinearConv etc.), manifest.json
    (K > 1 timestep groups)        + model.g{g}.onnx (and model.g{g}.fp16.onnx): one graph per group,
                                   export/groups.py; --timestep-groups collapsed writes model.onnx only

Each manifest links the calibrated state's hash, lists the inputs, the Q/DQ formats per layer,
the export-time scales and what the target cannot represent. Each target folder is written to a
temp folder and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import onnx

from saq_deploy.errors import ConfigError
from saq_deploy.export.qdq import TARGETS
from saq_deploy.utils.io import fsync_tree, name_intended, owned_temp_prefix, publish_mode

EXPORT_DIR = "onnx"
MODEL_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
MANIFEST_FILE = "manifest.json"
# QDQPropagationTransformer copies Q nodes across Reshape with a mismatched zero-point type on
# opset-21 graphs (ORT 1.31: "output_dtype INT8 does not match y_zero_point type UINT8").
ORT_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)
COND_INPUTS = {"class": "class_labels", "text": "encoder_hidden_states"}  # graph input per model kind


def model_meta(loaded, manifest: dict | None = None) -> dict:
    """What a standalone engine needs to sample without the PyTorch model."""
    meta = {"name": loaded.name, "kind": loaded.kind, "sample_shape": list(loaded.sample_shape),
            "num_classes": loaded.num_classes, "null_label": loaded.null_label,
            "scheduler_config": dict(loaded.scheduler_config), "source_hash": loaded.source_hash,
            "unet_class": type(loaded.unet).__name__,
            "unet_config": {k: v for k, v in dict(loaded.unet.config).items() if not k.startswith("_")}}
    if manifest is not None:
        meta["calibrated_for"] = manifest.get("calibrated_for")
        meta["method"], meta["bits"] = manifest.get("method"), manifest.get("bits")
    return meta


def build_target_model(fp_model: onnx.ModelProto, plan, target: str, feeds: list[dict],
                       scales: dict[str, float] | None = None):
    """FP graph + plan -> Q/DQ graph for ``target`` (checked) and its QdqReport. ``scales``: the
    export-time scales to use instead of observing them on ``feeds`` (a timestep group's graph
    takes the collapsed graph's, so every group rounds conv outputs / residuals alike)."""
    from saq_deploy.export import qdq
    from saq_deploy.export.graph import opset_of

    model = onnx.ModelProto()
    model.CopyFrom(fp_model)
    rep = qdq.insert_layer_qdq(model, plan, target)
    n_bias = 0
    if target == "onnxruntime-cpu":
        outs = qdq.conv_outputs_to_quantize(model)
        scales = qdq.observe_absmax(model, outs, feeds) if scales is None else {o: scales[o] for o in outs}
        n_bias = qdq.quantize_conv_biases(model, outs)
        qdq.insert_tensor_qdq(model, scales, rewire_outputs=True)
    else:
        res = qdq.residual_add_inputs(model)
        tensors = sorted({r[2] for r in res})
        scales = qdq.observe_absmax(model, tensors, feeds) if scales is None else {t: scales[t] for t in tensors}
        qdq.insert_tensor_qdq(model, scales, rewire_outputs=False, residuals=res)
    rep.observed = scales
    rep.opset = opset_of(model)
    if scales:
        what = "conv outputs (QLinearConv fusion)" if target == "onnxruntime-cpu" else "residual Add inputs"
        rep.not_represented.append(f"{len(scales)} {what} quantized to INT8 with export-time scales "
                                   f"(absmax/127 over {len(feeds)} recorded UNet calls): not in the fake-quant model "
                                   "(the parity gate's reference rounds them too where they are layer outputs)")
    if target == "onnxruntime-cpu" and n_bias:
        rep.not_represented.append(f"{n_bias} conv biases as INT32 at input x weight scale (QLinearConv): "
                                   "not in the fake-quant model (the parity gate's reference uses them too)")
    onnx.checker.check_model(model, full_check=True)
    return model, rep


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16-typed sibling for strongly typed TensorRT: I/O stay FP32 (Casts at the edges); the
    sinusoidal timestep embedding stays FP32 (t * freq near 1000 loses its phase in FP16), and so
    does an SDXL-class UNet's sinusoidal time-ids embedding (pixel sizes near 1024, same reason)."""
    from onnxconverter_common import float16

    # top-level ops (timestep broadcast and casts) and the sinusoidal projections
    keep = [n.name for n in model.graph.node
            if "/time_proj/" in n.name or "/add_time_proj/" in n.name
            or (n.name.startswith("/unet/") and n.name.count("/") == 2)]
    src = onnx.ModelProto()
    src.CopyFrom(model)
    del src.graph.value_info[:]  # stale FP32 types would contradict the converted Casts
    fp16 = float16.convert_float_to_float16(src, keep_io_types=True, node_block_list=keep,
                                            disable_shape_infer=False)
    # The converter types the outputs of the exporter's own Cast(to=FLOAT) nodes as FP16 but
    # leaves their `to`: make the two agree.
    vi = {v.name: v.type.tensor_type.elem_type for v in fp16.graph.value_info}
    for n in fp16.graph.node:
        if n.op_type == "Cast" and vi.get(n.output[0]) == onnx.TensorProto.FLOAT16:
            for a in n.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                    a.i = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(fp16, full_check=True)
    return fp16


def has_4bit_activations(manifest: dict) -> bool:
    act = manifest["quant_config"]["act"]
    return act.get("bits") == 4 and act.get("enabled", True)


def default_targets(artifact: str | Path) -> tuple[str, ...]:
    """Every placement the artifact can go to: W4A4 (4-bit activations) is ONNX Runtime only."""
    from saq_deploy.calibrate.artifact import verify_artifact

    manifest = verify_artifact(Path(artifact))
    return tuple(t for t in TARGETS if not (t == "tensorrt" and has_4bit_activations(manifest)))


def export_artifact(artifact: str | Path, targets: tuple[str, ...] = TARGETS, *, n_calib: int = 8,
                    steps: int = 10, seed: int = 0, fp16: bool = True,
                    timestep_groups: str | None = None) -> dict[str, Path]:
    """Export every target into ``<artifact>/onnx/<target>/``; returns target -> folder.
    ``timestep_groups`` (artifacts calibrated with K > 1 activation-step groups): "per-group" (the
    default there) also writes one graph per group (``export/groups.py``), "collapsed" only the
    single graph whose steps are each quantizer's largest."""
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.export.feeds import record_calls
    from saq_deploy.export.groups import resolve_mode
    from saq_deploy.export.plan import build_plan
    from saq_deploy.export.torch_export import export_unet_onnx

    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ConfigError(f"unknown export target(s) {bad}; choose from {', '.join(TARGETS)}")
    artifact = Path(artifact)
    q = load_artifact(artifact)
    cond, null = q.prompt_cond(n_calib)  # a text UNet: its calibration prompts and negative prompt
    if q.loaded.kind == "text" and cond is None:
        raise ConfigError(f"'{artifact}' is a cross-attention UNet calibrated without stored prompt embeddings; "
                          "re-run saq-deploy calibrate")
    if "tensorrt" in targets and has_4bit_activations(q.manifest):
        raise ConfigError("W4A4 has 4-bit activations, which TensorRT cannot run (its INT4 is weight-only): "
                          "export with --target onnxruntime-cpu")
    plan = build_plan(q.loaded.unet)
    mode = resolve_mode(timestep_groups, plan.timestep_groups)
    calls = record_calls(q.eps_model(), q.loaded, steps=steps, n=n_calib, seed=seed, cond=cond, null_cond=null)
    from saq_deploy.models.eps_model import AddedCond

    cond_name = COND_INPUTS.get(q.loaded.kind)
    added = AddedCond.of(q.loaded.unet.config) if q.loaded.kind == "text" else None
    feeds = [c.feed(cond_name, added) for c in calls]
    root = artifact / EXPORT_DIR
    root.mkdir(exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory(dir=root, prefix=owned_temp_prefix(".fp-")) as tmp:
        fp_path = Path(tmp) / "fp32.onnx"
        try:
            specs = export_unet_onnx(q.fp_unet, q.loaded.kind, q.loaded.sample_shape, fp_path,
                                     cond_shape=None if cond is None else tuple(cond.shape[1:]))
        except OSError as e:  # torch's failed write (disk full) names no file: name the export folder
            raise name_intended(e, tmp, root) from None
        meta, n_calls = model_meta(q.loaded, q.manifest), len(calls)
        # the torch UNets (FP + fake-quant) are done with: an SD-1.5 UNet's copies (~7 GB) beside its
        # ONNX graphs and ORT's observer session got export OOM-killed at 21 GB RSS on a 24 GB machine
        q.fp_unet = q.loaded.unet = calls = None
        gc.collect()
        fp_model = onnx.load(str(fp_path))
        for target in targets:
            model, rep = build_target_model(fp_model, plan, target, feeds)
            groups = _group_writer(mode, fp_model, plan, target, feeds, rep.observed, fp16, q.manifest)
            out[target] = _write_target(root, target, model, rep, specs, q, meta, n_calls, fp16, groups)
            model = None  # not alive while the next target's graph is built
            gc.collect()
    return out


def remove_stale_export_temps(root: Path, target: str) -> list[Path]:
    """An export killed mid-write leaves ``.<target>-*`` / ``.old-*`` / ``.fp-*`` in ``root``; they are
    never read (only the renamed folder is), so remove those of dead processes and say so on stderr."""
    from saq_deploy.utils.io import remove_stale_temps

    return remove_stale_temps(root, (f".{target}-", ".old-", ".fp-"), "an interrupted export")


def _group_writer(mode: str, fp_model, plan, target: str, feeds: list[dict], scales: dict, fp16: bool,
                  manifest: dict):
    """``tmp -> (files, manifest section)`` writing the timestep groups' graphs into the export's
    temp folder (export/groups.py), one graph in memory at a time."""
    from saq_deploy.export.groups import write_group_graphs

    def write(tmp: Path) -> tuple[dict, dict]:
        return write_group_graphs(tmp, mode, plan, manifest, target=target, fp16=fp16 and target == "tensorrt",
                                  build=lambda p: build_target_model(fp_model, p, target, feeds, scales)[0],
                                  fp16_of=to_fp16)
    return write


def _write_target(root: Path, target: str, model: onnx.ModelProto, rep, specs, q, meta: dict, n_calls: int,
                  fp16: bool, groups=None) -> Path:
    from saq_deploy.utils.io import sha256_file, write_json_atomic
    from saq_deploy.utils.versions import package_versions

    final = root / target
    remove_stale_export_temps(root, target)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=owned_temp_prefix(f".{target}-")))
    try:
        writing = final / MODEL_FILE  # what a failed onnx.save (it names no file) was writing
        onnx.save(model, str(tmp / MODEL_FILE))
        files = {MODEL_FILE: sha256_file(tmp / MODEL_FILE)}
        if target == "tensorrt" and fp16:
            writing = final / FP16_FILE
            onnx.save(to_fp16(model), str(tmp / FP16_FILE))
            files[FP16_FILE] = sha256_file(tmp / FP16_FILE)
        m = q.manifest
        group_files, group_section = groups(tmp) if groups is not None else ({}, None)
        files.update(group_files)
        write_json_atomic(tmp / MANIFEST_FILE, {
            "artifact": "saq-deploy-onnx", "target": target, "files": files,
            "calibrated": {"path": str(q.path), "state_sha256": m["state_sha256"], "method": m["method"],
                           "bits": m["bits"], "model_spec": m["model"]["spec"], "model_hash": m["model"]["hash"]},
            "model_meta": meta,
            "inputs": specs, "outputs": [{"name": "eps", "dtype": "float32", "shape": specs[0]["shape"]}],
            "opset": rep.opset, "qdq": rep.to_dict(), "calibration_calls": n_calls,
            "ort_disabled_optimizers": list(ORT_DISABLED_OPTIMIZERS), "versions": package_versions(),
            **({"timestep_groups": group_section} if group_section is not None else {}),
        })
        fsync_tree(tmp)
        publish_mode(tmp)  # mkdtemp's 0700 -> the mode a plain mkdir would give
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=root, prefix=owned_temp_prefix(".old-")))
            final.rename(trash / target)
            tmp.rename(final)
            shutil.rmtree(trash)
        else:
            tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # onnx.save's failed write (disk full) names no file, atomic writes name the temp folder's
        raise name_intended(e, tmp, writing if e.filename is None else final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
