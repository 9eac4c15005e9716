"""The calibrated artifact: a folder holding the calibrated state (safetensors), the recipe, a
manifest and a short report. Loading it rebuilds the identical fake-quant model.

    runs/x/
      calibrated.safetensors   integer weights (int8 codes; int4 values for 4-bit), scales, act steps
      recipe.json              the resolved recipe
      manifest.json            method, bits, sampler, steps, seeds, source-model hash, state hash,
                               per-block losses, wall time, layer specs, versions
      report.md                human-readable summary
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.errors import ModelLoadError

STATE_FILE = "calibrated.safetensors"
MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.json"
REPORT_FILE = "report.md"
FORMAT_VERSION = 1


class FakeQuantEpsModel:
    """EpsModel over a fake-quant UNet: sets the timestep-group context, then calls the UNet."""

    def __init__(self, unet: torch.nn.Module, timestep_groups: int = 1, num_train_timesteps: int = 1000):
        from saq_deploy.models.eps_model import TorchEpsModel

        self.inner = TorchEpsModel(unet)
        self.groups = timestep_groups
        self.T = num_train_timesteps

    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        from saq_deploy.quant.timestep import active_timesteps, timestep_groups

        t = timestep.reshape(-1).expand(x.shape[0]) if timestep.numel() == 1 else timestep
        with active_timesteps(timestep_groups(t, self.groups, self.T)):
            return self.inner(x, timestep, cond)


@dataclass
class CalibratedModel:
    path: Path
    manifest: dict
    loaded: object  # saq_deploy.models.loading.LoadedModel whose .unet is the fake-quant UNet
    fp_unet: torch.nn.Module

    def eps_model(self) -> FakeQuantEpsModel:
        return FakeQuantEpsModel(self.loaded.unet, self.manifest["quant_config"]["act"]["timestep_groups"])


def save_artifact(out_dir: Path, *, unet: torch.nn.Module, manifest: dict, recipe: dict, report: str) -> None:
    """Write into ``out_dir`` (a fresh temp folder the caller renames into place)."""
    from safetensors.torch import save_file

    from saq_deploy.quant.state import quant_layer_specs, quant_state_dict
    from saq_deploy.utils.io import sha256_file, write_json_atomic

    state = {k: v.contiguous() for k, v in quant_state_dict(unet).items()}
    save_file(state, str(out_dir / STATE_FILE), metadata={"format": "saq-deploy-calibrated",
                                                           "version": str(FORMAT_VERSION)})
    manifest = {**manifest, "format_version": FORMAT_VERSION,
                "state_sha256": sha256_file(out_dir / STATE_FILE),
                "layer_specs": quant_layer_specs(unet)}
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    write_json_atomic(out_dir / RECIPE_FILE, recipe)
    (out_dir / REPORT_FILE).write_text(report)


def read_manifest(path: Path) -> dict:
    from saq_deploy.utils.io import read_folder_manifest

    return read_folder_manifest(path, MANIFEST_FILE, "a calibrated artifact", "create one with saq-deploy calibrate")


def load_artifact(path: str | Path, *, verify: bool = True) -> CalibratedModel:
    """Rebuild the fake-quant model; refuses an artifact whose files do not match its manifest."""
    from safetensors.torch import load_file

    from saq_deploy.models.loading import load_model
    from saq_deploy.quant.config import QuantConfig
    from saq_deploy.quant.state import load_quant_state
    from saq_deploy.utils.io import sha256_file

    path = Path(path)
    manifest = read_manifest(path)
    state_path = path / STATE_FILE
    if not state_path.exists():
        raise ModelLoadError(f"'{path}' has no {STATE_FILE}")
    if verify and sha256_file(state_path) != manifest.get("state_sha256"):
        raise ModelLoadError(f"'{state_path}' does not match the hash in its manifest: the artifact was "
                             "modified or is incomplete; re-run saq-deploy calibrate")
    loaded = load_model(manifest["model"]["spec"])
    if verify and loaded.source_hash != manifest["model"]["hash"]:
        raise ModelLoadError(f"source model {manifest['model']['spec']} changed since calibration "
                             "(hash mismatch); re-calibrate")
    try:
        state = load_file(str(state_path))
    except Exception as e:
        raise ModelLoadError(f"'{state_path}' is not a valid safetensors file ({e})") from e
    fp_unet = copy.deepcopy(loaded.unet)
    config = QuantConfig.from_dict(manifest["quant_config"])
    load_quant_state(loaded.unet, config, state, manifest["layer_specs"])
    loaded.unet.eval()
    return CalibratedModel(path=path, manifest=manifest, loaded=loaded, fp_unet=fp_unet)
