"""Shared inputs and the setup functions of the bad-input catalogue (test_bad_input_catalogue.py).

Every setup takes the row's folder and spoils a copy the runner made there (``art``: the
calibrated artifact with its cached ONNX export and engine, ``other``, ``model``)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from saq_deploy.reference import DIGITS_UNET_DIR

DIGITS = DIGITS_UNET_DIR  # the builtin:digits folder the "model" rows copy

WEIGHTS = "model/diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class Base:
    art: Path  # minmax W8A8 artifact + onnx/onnxruntime-cpu/ + engine/
    other: Path  # the same artifact re-calibrated (one activation step differs): another state hash


def build_base(root: Path) -> Base:
    """The cheapest real artifact and engine: minmax (no reconstruction), 2 seeds x 2 steps, and an
    export whose observers see 1 two-step trajectory (the rows only need files that verify)."""
    from saq_deploy.backends import build_engine
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.export.api import export_artifact

    art = root / "w8a8"
    calibrate(Recipe().with_overrides({"calibration.method": "minmax", "quant.bits": "w8a8",
                                       "calibration.num_samples": 2, "calibration.steps": 2}), art)
    export_artifact(art, ("onnxruntime-cpu",), n_calib=1, steps=2)
    build_engine(art, "onnxruntime", opt_level="basic")
    other = root / "other"
    shutil.copytree(art, other, ignore=shutil.ignore_patterns("onnx", "engine"))
    _recalibrated(other)
    return Base(art=art, other=other)


def _recalibrated(art: Path) -> None:
    """A state that verifies (hash, settings copy, recipe) but differs from the engine's source: what
    re-running calibrate with another seed gives, without paying for a second calibration."""
    from safetensors import safe_open

    from saq_deploy.utils.io import save_safetensors, sha256_file

    path = art / "calibrated.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a dict
    key = next(k for k in sorted(tensors) if k.endswith("act_step"))
    tensors[key] = tensors[key] * 1.5
    save_safetensors(tensors, path, metadata=meta)
    m = json.loads((art / "manifest.json").read_text())
    m["state_sha256"] = sha256_file(path)
    (art / "manifest.json").write_text(json.dumps(m))


def can_bind_mount_readonly(tmp: Path) -> bool:
    probe = tmp / ".probe"
    probe.mkdir()
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", (f"mount --bind {probe} {probe} && "
                            f"mount -o remount,bind,ro {probe} && ! touch {probe}/x 2>/dev/null")],
                           capture_output=True, check=False, timeout=30)
        return r.returncode == 0 and not (probe / "x").exists()
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# --- setups -------------------------------------------------------------------------------------
def a_file(rel: str):
    return lambda tmp: (tmp / rel).write_text("x")


def a_text(rel: str, text: str):
    return lambda tmp: (tmp / rel).write_text(text)


def a_folder(rel: str):
    return lambda tmp: (tmp / rel).mkdir(parents=True)


def user_folder(rel: str):
    def setup(tmp: Path) -> None:
        (tmp / rel).mkdir()
        (tmp / rel / "thesis.tex").write_text("months of work")
    return setup


def write(rel: str, text: str):
    return lambda tmp: (tmp / rel).write_text(text)


def rm(rel: str):
    return lambda tmp: (tmp / rel).unlink()


def recipe(text: str):
    return write("r.toml", text)


def truncate(rel: str):
    def setup(tmp: Path) -> None:
        p = tmp / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return setup


def append_byte(rel: str):
    def setup(tmp: Path) -> None:
        with open(tmp / rel, "ab") as f:
            f.write(b"\0")
    return setup


def junk_onnx(tmp: Path) -> None:
    (tmp / "m.onnx").write_text("this is not a protobuf")


def relu_onnx(tmp: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g), str(tmp / "m.onnx"))


def garbage_weights(tmp: Path) -> None:
    (tmp / WEIGHTS).write_bytes(b"\x00garbage" * 100)


def truncated_weights(tmp: Path) -> None:
    truncate(WEIGHTS)(tmp)


def pickle_weights(tmp: Path) -> None:
    (tmp / WEIGHTS).write_bytes(pickle.dumps({"conv_in.weight": [0.0] * 16}))


def pickle_bin(tmp: Path) -> None:
    """What an attacker ships: a pickle whose unpickling builds an arbitrary object (here a harmless
    Namespace; a real one would name os.system)."""
    import torch

    (tmp / WEIGHTS).unlink()
    torch.save({"conv_in.weight": torch.zeros(1), "payload": Namespace(x=1)},
               tmp / "model" / "diffusion_pytorch_model.bin")


def _edit_weights(tmp: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp / WEIGHTS))
    change(w)
    save_file(w, str(tmp / WEIGHTS))


def drop_key(tmp: Path) -> None:
    _edit_weights(tmp, lambda w: w.pop("conv_out.weight"))


def extra_key(tmp: Path) -> None:
    import torch

    _edit_weights(tmp, lambda w: w.update({"extra.weight": torch.zeros(3)}))


def wrong_class(tmp: Path) -> None:
    cfg = tmp / "model" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "VQModel"}))


def _edit_json(tmp: Path, rel: str, change) -> None:
    p = tmp / rel
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m))


def edit_manifest(field: str, value):
    return lambda tmp: _edit_json(tmp, "art/manifest.json", lambda m: m.update({field: value}))


def edit_act_bits(tmp: Path) -> None:
    _edit_json(tmp, "art/manifest.json", lambda m: m["quant_config"]["act"].update(bits=4))


def edit_recipe(tmp: Path) -> None:
    p = tmp / "art" / "recipe.json"
    p.write_text(p.read_text().replace('"minmax"', '"brecq"'))


def pickle_state(tmp: Path) -> None:
    from saq_deploy.utils.io import sha256_file

    state = tmp / "art" / "calibrated.safetensors"
    state.write_bytes(pickle.dumps({"weight_int": [1, 2, 3]}))
    _edit_json(tmp, "art/manifest.json", lambda m: m.update(state_sha256=sha256_file(state)))


def loosen_gate(tmp: Path) -> None:
    _edit_json(tmp, "art/engine/manifest.json", lambda m: m["parity"].update(min_psnr_db=0.0))
