"""The calibrated artifact: a folder holding the calibrated state (safetensors), the recipe, a
manifest and a short report. Loading it rebuilds the identical fake-quant model.

    runs/x/
      calibrated.safetensors   integer weights (int8 codes; int4 values for 4-bit), scales, act steps
      recipe.json              the resolved recipe
      manifest.json            method, bits, sampler, steps, seeds, source-model hash, state hash,
                               per-block losses, wall time, layer specs, versions
      report.md                human-readable summary
      prompts.safetensors      text UNets: the calibration prompts' embedding rows (P [+ 1], L, D),
                               the negative prompt last (hashed in the manifest's ``prompts``)
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
PROMPTS_FILE = "prompts.safetensors"
FORMAT_VERSION = 1


class FakeQuantEpsModel:
    """EpsModel over a fake-quant UNet: sets the timestep-group context, then calls the UNet."""

    def __init__(self, unet: torch.nn.Module, timestep_groups: int = 1, num_train_timesteps: int = 1000):
        """``timestep_groups``: a count or a ``quant.timestep.TimestepGroups`` (with boundaries)."""
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
        from saq_deploy.quant.timestep import TimestepGroups

        qc = self.manifest["quant_config"]
        return FakeQuantEpsModel(self.loaded.unet, TimestepGroups.from_quant_config(qc),
                                 int(qc.get("num_train_timesteps", 1000)))

    def prompt_cond(self, n: int) -> tuple[Tensor | None, Tensor | None]:
        """A text artifact's sampling inputs: its calibration prompts' embeddings cycled over ``n``
        samples (n, L, D) and the negative prompt's (1, L, D) or None; (None, None) for other kinds."""
        info = self.manifest.get("prompts")
        if info is None:
            return None, None
        from safetensors import safe_open

        with safe_open(str(self.path / info["file"]), framework="pt") as f:
            table = f.get_tensor("table")
        p = int(info["prompts"])
        return table[torch.arange(n) % p].contiguous(), table[p:p + 1] if info["negative"] else None


# Manifest fields that decide behaviour (thresholds, quantizer layout, which model). A copy lives in
# the state file's header, so ``state_sha256`` covers them and an edited manifest is caught.
BEHAVIOUR_FIELDS = ("method", "bits", "quant_config", "layer_specs", "model", "recipe_sha256", "prompts")
BEHAVIOUR_KEY = "behaviour"


def _behaviour(manifest: dict) -> dict:
    """The behaviour-deciding fields as plain JSON data (tuples become lists, as in manifest.json)."""
    import json

    return json.loads(json.dumps({k: manifest.get(k) for k in BEHAVIOUR_FIELDS}, default=str))


def save_artifact(out_dir: Path, *, unet: torch.nn.Module, manifest: dict, recipe: dict, report: str) -> None:
    """Write into ``out_dir`` (a fresh temp folder the caller renames into place)."""
    import json

    from saq_deploy.quant.state import quant_layer_specs, quant_state_dict
    from saq_deploy.utils.io import save_safetensors, sha256_file, write_bytes_atomic, write_json_atomic

    write_json_atomic(out_dir / RECIPE_FILE, recipe)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "layer_specs": quant_layer_specs(unet),
                "recipe_sha256": sha256_file(out_dir / RECIPE_FILE)}
    behaviour = json.dumps(_behaviour(manifest), sort_keys=True, separators=(",", ":"))
    state = {k: v.contiguous() for k, v in quant_state_dict(unet).items()}
    save_safetensors(state, out_dir / STATE_FILE, metadata={"format": "saq-deploy-calibrated",
                                                             "version": str(FORMAT_VERSION),
                                                             BEHAVIOUR_KEY: behaviour})
    manifest["state_sha256"] = sha256_file(out_dir / STATE_FILE)
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    write_bytes_atomic(out_dir / REPORT_FILE, report)


def read_manifest(path: Path) -> dict:
    from saq_deploy.utils.io import read_folder_manifest

    return read_folder_manifest(path, MANIFEST_FILE, "a calibrated artifact", "create one with saq-deploy calibrate")


def verify_artifact(path: str | Path) -> dict:
    """The manifest of an artifact whose files match it (ModelLoadError otherwise): the state file
    against ``state_sha256``, the manifest's behaviour fields against the copy inside the state file,
    and ``recipe.json`` against ``recipe_sha256``. Reads no model weights."""
    import json

    from safetensors import safe_open

    from saq_deploy.utils.io import sha256_file

    path = Path(path)
    manifest = read_manifest(path)
    state_path = path / STATE_FILE
    if not state_path.exists():
        raise ModelLoadError(f"'{path}' has no {STATE_FILE}; re-run saq-deploy calibrate")
    if sha256_file(state_path) != manifest.get("state_sha256"):
        raise ModelLoadError(f"'{state_path}' does not match the hash in its manifest: the artifact was "
                             "modified or is incomplete; re-run saq-deploy calibrate")
    try:
        with safe_open(str(state_path), framework="pt") as f:
            embedded = (f.metadata() or {}).get(BEHAVIOUR_KEY)
    except Exception as e:
        raise ModelLoadError(f"'{state_path}' is not a valid safetensors file ({e})") from e
    if embedded is None:
        raise ModelLoadError(f"'{path}' was made by an older saq-deploy (its state carries no settings "
                             "copy); re-run saq-deploy calibrate")
    stored, claimed = json.loads(embedded), _behaviour(manifest)
    edited = sorted(k for k in BEHAVIOUR_FIELDS if stored.get(k) != claimed.get(k))
    if edited:
        raise ModelLoadError(f"'{path / MANIFEST_FILE}' field(s) {', '.join(edited)} differ from the settings "
                             "stored in the calibrated state: the manifest was edited; restore it or re-run "
                             "saq-deploy calibrate")
    recipe = path / RECIPE_FILE
    if not recipe.exists() or sha256_file(recipe) != manifest.get("recipe_sha256"):
        raise ModelLoadError(f"'{recipe}' is missing or does not match the hash in its manifest; restore it "
                             "or re-run saq-deploy calibrate")
    prompts = manifest.get("prompts")
    if prompts is not None and (not (path / PROMPTS_FILE).is_file()
                                or sha256_file(path / PROMPTS_FILE) != prompts.get("data_sha256")):
        raise ModelLoadError(f"'{path / PROMPTS_FILE}' is missing or does not match the hash in its manifest; "
                             "restore it or re-run saq-deploy calibrate")
    return manifest


def load_artifact(path: str | Path, *, verify: bool = True) -> CalibratedModel:
    """Rebuild the fake-quant model; refuses an artifact whose files do not match its manifest."""
    from safetensors.torch import load_file

    from saq_deploy.models.loading import load_model
    from saq_deploy.quant.config import QuantConfig
    from saq_deploy.quant.state import load_quant_state

    path = Path(path)
    manifest = verify_artifact(path) if verify else read_manifest(path)
    state_path = path / STATE_FILE
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
