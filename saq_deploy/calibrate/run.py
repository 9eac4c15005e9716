"""`calibrate(recipe, out_dir)`: sampler trajectories -> fake-quant model -> calibrated artifact.

Work in progress lives in ``.<out>.partial/`` beside the output: the trajectory shards and, for
reconstruction methods, a checkpoint after every block. Re-running the same recipe after a kill
resumes at the last finished block and ends bit-identical to an uninterrupted run (CPU): every
block is trained from its own seed, and the checkpoint holds the exact integer weights and steps.
The output folder appears only when everything succeeded (atomic rename).

After a kill -9 the same command cleans up what the kill left (docs/results/faults.md measures it):
a kill during data collection leaves ``.data.*.tmp`` in ``.partial/``, which the re-run removes
(saying so on stderr) before collecting again, as shards are trusted only once renamed into place;
a kill after the artifact's rename but before ``.partial`` was removed leaves a complete artifact,
which the re-run verifies before removing ``.partial`` and succeeding."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from saq_deploy.calibrate.methods import get_method
from saq_deploy.calibrate.recipe import Recipe, quant_config_for
from saq_deploy.calibrate.steps import CKPT_INFO
from saq_deploy.errors import ConfigError
from saq_deploy.utils.io import fsync_dir, fsync_tree


def recipe_hash(recipe: Recipe, prompts=None) -> str:
    """The run's identity for resume: the recipe, and the content of its prompt embeddings file."""
    data = recipe.to_dict()
    if prompts is not None:  # an edited embeddings file under the same path is another run
        data["prompts_sha256"] = prompts.source_sha256
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def calibrate(recipe: Recipe, out_dir: str | Path, *, progress: bool = False,
              max_blocks: int | None = None, max_epochs: int | None = None) -> Path:
    """Run the recipe and write the artifact to ``out_dir``. ``max_blocks`` stops (with the
    checkpoint kept) after that many reconstructed blocks, ``max_epochs`` after that many QLoRA
    epochs: time-boxed runs and resume tests."""
    from saq_deploy.models.loading import load_model
    from saq_deploy.utils import distributed

    w = distributed.world()  # under torchrun: join the process group (docs/design/distributed.md)
    out_dir = Path(out_dir)
    work = out_dir.parent / f".{out_dir.name}.partial"
    if out_dir.exists():
        if _finish_cleanup(out_dir, work, recipe):
            return out_dir
        raise ConfigError(f"output '{out_dir}' already exists; pass another -o or delete it")
    method = get_method(recipe.calibration.method)
    method.check(recipe.quant.bits)  # a missing package or an unsupported bit width, before any work
    from saq_deploy.calibrate.prompts import bind_prompts, load_prompt_table

    prompts = load_prompt_table(recipe)  # [prompts] checked before the model loads
    rhash = recipe_hash(recipe, prompts)
    info_path = work / CKPT_INFO
    if info_path.exists() and json.loads(info_path.read_text()).get("recipe_hash") != rhash:
        raise ConfigError(f"an unfinished run with a different recipe is in '{work}'; delete it, or "
                          "re-run with the same recipe to resume")
    t0 = time.perf_counter()
    # a text UNet takes the prompt index as its integer cond (calibrate.prompts); others unchanged
    loaded = bind_prompts(load_model(recipe.model.spec), prompts)
    # every rank has checked the output and the checkpoint before rank 0 creates anything
    distributed.barrier("calibration set-up")
    work.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a failed load leaves no .partial
    from saq_deploy.calibrate.steps import collect_or_open, run_pipeline

    try:
        ds = collect_or_open(loaded, recipe, work / "data", progress=progress)
        # the one dispatch point on how a method runs (calibrate.methods)
        if method.fine_tunes:  # LoRA fine-tuning (saq_deploy.calibrate.qlora)
            from saq_deploy.calibrate.qlora import run_qlora

            qlora = run_qlora(loaded, recipe, ds, work, rhash, progress=progress, max_epochs=max_epochs)
            result = None if qlora is None else (qlora[0], [], qlora[1], {})
        else:
            result = run_pipeline(loaded, recipe, ds, work, rhash, progress=progress, max_blocks=max_blocks)
    except BaseException:
        if w.is_rank0 and not info_path.exists():  # nothing worth resuming: leave no partial folder behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if result is None:  # stopped early on purpose; checkpoint kept for resume
        return work
    if not w.is_rank0:  # rank 0 writes the artifact; the others wait so the run ends as one
        distributed.agree(None, "writing the artifact")
        return out_dir
    try:
        _write_artifact(out_dir, work, recipe, loaded, ds, result, t0, prompts, method,
                        qlora if method.fine_tunes else None)
    except BaseException as e:
        distributed.agree(e if isinstance(e, Exception) else None, "writing the artifact")
        raise
    distributed.agree(None, "writing the artifact")
    return out_dir


def _write_artifact(out_dir: Path, work: Path, recipe: Recipe, loaded, ds, result, t0: float, prompts, method,
                    qlora) -> None:
    from saq_deploy.calibrate.artifact import save_artifact

    unet, block_losses, qcfg, extra = result
    wall = time.perf_counter() - t0
    manifest = {**build_manifest(recipe, loaded, ds, qcfg, block_losses, wall), **extra}  # network_stage
    if prompts is not None:
        from saq_deploy.calibrate.artifact import PROMPTS_FILE

        manifest["prompts"] = {**prompts.info(), "file": PROMPTS_FILE,
                               "data_sha256": ds.manifest["cond_table"]["sha256"]}
    if method.fine_tunes:
        from saq_deploy.calibrate.qlora import DEPLOYMENT_NOTES

        manifest["qlora"] = qlora[2]
        if recipe.quant.bits in DEPLOYMENT_NOTES:
            manifest["deployment_note"] = DEPLOYMENT_NOTES[recipe.quant.bits]
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if prompts is not None:  # the embedding rows the data used, for export and the parity gate
        shutil.copyfile(ds.path / ds.manifest["cond_table"]["file"], tmp / manifest["prompts"]["file"])
    save_artifact(tmp, unet=unet, manifest=manifest, recipe=recipe.to_dict(),
                  report=render_report(manifest))
    fsync_tree(tmp)
    tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(work, ignore_errors=True)


def _finish_cleanup(out_dir: Path, work: Path, recipe: Recipe) -> bool:
    """True when a run of this recipe was killed after renaming its artifact into place but before
    removing its ``.partial`` folder (or while removing it): the artifact is complete and verified, so
    finish the cleanup, say so, and let the re-run succeed instead of refusing an existing output."""
    import sys

    from saq_deploy.calibrate.artifact import RECIPE_FILE, verify_artifact
    from saq_deploy.errors import ModelLoadError

    if not work.is_dir():
        return False
    try:
        verify_artifact(out_dir)
        same = json.loads((out_dir / RECIPE_FILE).read_text()) == json.loads(json.dumps(recipe.to_dict(), default=str))
    except (ModelLoadError, OSError, ValueError):
        return False
    if not same:
        return False
    shutil.rmtree(work, ignore_errors=True)
    print(f"removed {work} left by a run killed after it wrote '{out_dir}'; the artifact is complete",
          file=sys.stderr)
    return True


def build_manifest(recipe: Recipe, loaded, ds, qcfg, block_losses: list[dict], wall: float) -> dict:
    from saq_deploy.utils.versions import package_versions

    c = recipe.calibration
    return {
        "artifact": "saq-deploy-calibrated",
        "method": c.method, "bits": recipe.quant.bits,
        "sampler": c.sampler, "steps": c.steps, "spacing": c.spacing, "cfg": c.cfg, "seed": c.seed,
        "num_samples": c.num_samples, "orientation": c.orientation,
        **({"mota_weight": c.mota_weight} if c.mota_weight != 1.0 else {}),
        "calibrated_for": {"samplers": ["ddim", c.sampler], "steps": c.steps, "spacing": c.spacing},
        "model": {"spec": recipe.model.spec, "hash": loaded.source_hash},
        "data": {k: ds.manifest.get(k) for k in ("sampler", "pairing", "steps", "spacing", "seed",
                                                  "num_samples", "num_records", "grid", "intermediate_timesteps")},
        "quant_config": qcfg.to_dict(),
        "block_losses": block_losses,
        "wall_time_s": round(wall, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": package_versions(),
    }


def render_report(m: dict) -> str:
    lines = [f"# Calibrated artifact: {m['method']} {m['bits']}", "",
             f"- model: `{m['model']['spec']}` (sha256 {m['model']['hash'][:12]}…)",
             (f"- data: {m['sampler']} trajectories, {m['steps']} steps ({m['spacing']}), "
              f"{m['num_samples']} seeds from {m['seed']}, CFG {m['cfg']}"),
             f"- calibrated for: {', '.join(m['calibrated_for']['samplers'])} at {m['steps']} steps",
             f"- wall time: {m['wall_time_s']:.1f} s on {m['machine']}", ""]
    if m.get("qlora"):
        from saq_deploy.calibrate.qlora import report_lines

        lines += report_lines(m["qlora"]) + ([f"- deployment: {m['deployment_note']}", ""]
                                             if m.get("deployment_note") else [])
    if m.get("network_stage"):
        from saq_deploy.calibrate.network_stage import report_lines as network_lines

        lines += network_lines(m["network_stage"])
    if m["block_losses"]:
        lines += ["| block | loss before | loss after |", "|---|---|---|"]
        lines += [f"| {b['block']} | {b['loss_before']:.4g} | {b['loss_after']:.4g} |" for b in m["block_losses"]]
    return "\n".join(lines) + "\n"


__all__ = ["calibrate", "quant_config_for", "recipe_hash"]
