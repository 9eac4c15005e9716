"""The calibration pipeline's steps: data, quantize, activation init, block reconstruction
(then, with ``reconstruction.network_iters``, the network stage: calibrate.network_stage)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch

from saq_deploy.calibrate.methods import get_method
from saq_deploy.calibrate.recipe import Recipe, quant_config_for

CKPT_STATE, CKPT_INFO = "ckpt.safetensors", "ckpt.json"


def collect_or_open(loaded, recipe: Recipe, data_dir: Path, *, progress: bool):
    """Reuse the trajectory shards of an interrupted run, else collect them (after checking that
    the recipe's quantization fits the model: a misfit must not cost minutes of sampling first)."""
    from saq_deploy.calibrate.dataset import TrajectoryDataset
    from saq_deploy.calibrate.trajectory import collect_trajectories

    check_block_sizes(loaded.unet, recipe, loaded.schedule().num_train_timesteps)
    if (data_dir / "manifest.json").exists():
        ds = TrajectoryDataset(data_dir)
        stored = ds.cond_table()
        if (stored is None) != (loaded.cond_table is None) or (
                stored is not None and not torch.equal(stored, loaded.cond_table)):
            from saq_deploy.errors import ConfigError

            raise ConfigError(f"the trajectory data in '{data_dir}' were collected with other prompt "
                              f"embeddings; delete '{data_dir.parent}' to start over")
        return ds
    c = recipe.calibration
    return collect_trajectories(
        loaded.eps_model(), loaded.schedule(), data_dir, num_samples=c.num_samples, steps=c.steps,
        seed=c.seed, cfg=c.cfg, num_classes=loaded.num_classes, null_label=loaded.null_label,
        sample_shape=loaded.sample_shape, sampler=c.sampler, spacing=c.spacing, pairing=data_pairing(recipe),
        model_hash=loaded.source_hash, progress=progress, cond_table=loaded.cond_table)


def data_pairing(recipe: Recipe) -> str:
    """Which points the trajectory data pairs: the recipe's orientation for a MOTA reconstruction."""
    m, c = get_method(recipe.calibration.method), recipe.calibration
    return c.orientation if m.mota and m.reconstructs else "outer_to_intermediate"


def check_block_sizes(unet, recipe: Recipe, num_train_timesteps: int) -> None:
    """One ConfigError, in recipe terms, if an INT4 block size does not divide a Linear's input width.

    No silent per-layer fallback: a layer quietly left per-channel would export differently from
    what the recipe says (TensorRT's INT4 GEMMs want blocks); ``quant.weight_block_size = 0``
    (per-channel INT4 on every 4-bit Linear) is the recipe's own fallback."""
    from saq_deploy.errors import ConfigError
    from saq_deploy.quant.api import block_size_conflicts

    bs = recipe.quant.weight_block_size
    bad = block_size_conflicts(unet, quant_config_for(recipe, num_train_timesteps))
    if not bad:
        return
    name, width = bad[0]
    widths = {w for _, w in bad}
    fits = [b for b in (64, 128) if all(w % b == 0 for w in widths)]
    fix = (f"set quant.weight_block_size = {' or '.join(map(str, fits))}, or 0 for per-channel INT4" if fits
           else "neither 64 nor 128 (TensorRT's INT4 block sizes) divides it: set quant.weight_block_size = 0 "
                "(per-channel INT4)")
    more = f" (and {len(bad) - 1} more Linear layer(s), input widths {sorted(widths)})" if len(bad) > 1 else ""
    raise ConfigError(f"quant.weight_block_size = {bs} does not divide the input width {width} of Linear "
                      f"layer '{name}'{more}; {fix}")


class Records:
    """Student and target UNet inputs (CFG: each record twice, with its label and the null label).
    A text UNet's labels are prompt indices into ``table`` (calibrate.prompts); pass it to feeds."""

    def __init__(self, ds, recipe: Recipe, null_label: int | None, table: torch.Tensor | None = None):
        self.table = table
        sf, tf = ds.student_fields(), ds.target_fields()
        s, t = ds.load_fields(sf), ds.load_fields(tf)
        same_point = not get_method(recipe.calibration.method).mota  # brecq: FP target at the student point
        xs, ts = s[sf.x], s[sf.t].float()
        labels = s[sf.cond] if ds.conditional else None  # unconditional records store label -1
        xt, tt = (xs, ts) if same_point else (t[tf.x], t[tf.t].float())
        n = recipe.reconstruction.max_inputs // (2 if null_label is not None and labels is not None else 1)
        if len(xs) > n:  # seeded subset keeps memory bounded
            idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(recipe.calibration.seed))[:n]
            xs, ts, xt, tt = xs[idx], ts[idx], xt[idx], tt[idx]
            labels = None if labels is None else labels[idx]
        if labels is not None and null_label is not None and recipe.calibration.cfg != 1.0:
            nulls = torch.full_like(labels, null_label)
            xs, ts, xt, tt = torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([xt, xt]), torch.cat([tt, tt])
            labels = torch.cat([labels, nulls])
        self.student = (xs, ts, labels)
        self.target = (xt, tt, labels)

    @staticmethod
    def feeds(unet, point, groups: int, T: int, batch: int = 128,
              table: torch.Tensor | None = None) -> list[Callable[[], object]]:
        from saq_deploy.models.eps_model import cond_kwargs
        from saq_deploy.quant.timestep import active_timesteps, timestep_groups

        x, t, labels = point

        def make(sl):
            def run():
                cond = {"class_labels": None} if labels is None else cond_kwargs(labels[sl], table, unet)
                with active_timesteps(timestep_groups(t[sl], groups, T)):
                    return unet(x[sl], t[sl], **cond, return_dict=False)
            return run

        return [make(slice(i, i + batch)) for i in range(0, len(x), batch)]


def _leaf_types() -> tuple[type, ...]:
    from saq_deploy.quant.fake_quant import QuantConv2d, QuantLinear

    return (QuantConv2d, QuantLinear)


def _act_method(method: str, observer: str, act_bits: int) -> str:
    """Baselines name their observer; reconstruction methods start from ``observer`` ("auto":
    minmax for 8-bit activations, whose outliers matter in diffusion UNets; MSE for 4-bit)."""
    if (fixed := get_method(method).act_observer) is not None:
        return fixed
    if observer != "auto":
        return observer
    return "minmax" if act_bits >= 8 else "mse"


def run_pipeline(loaded, recipe: Recipe, ds, work: Path, rhash: str, *, progress: bool,
                 max_blocks: int | None):
    """Quantize ``loaded.unet`` in place and calibrate it. Returns (unet, block losses, config,
    further manifest sections), or None when stopped after ``max_blocks`` (checkpoint kept)."""
    from saq_deploy.quant.api import quantize_
    from saq_deploy.quant.observers import init_act_steps

    method = get_method(recipe.calibration.method)
    T = loaded.schedule().num_train_timesteps
    qcfg = quant_config_for(recipe, T)
    groups = qcfg.act.grouping
    fp_unet = copy.deepcopy(loaded.unet).eval()
    records = Records(ds, recipe, loaded.null_label, loaded.cond_table)
    ckpt = _read_ckpt(work, rhash)
    from saq_deploy.utils.distributed import barrier

    barrier("checkpoint read")  # every rank resumes from the same checkpoint before rank 0 writes one
    if ckpt is not None:
        unet = _restore(fp_unet, qcfg, work, ckpt["layer_specs"])
        done, losses = ckpt["blocks_done"], ckpt["block_losses"]
    else:
        unet = loaded.unet
        quantize_(unet, qcfg)
        if method.runner == "modelopt":  # ModelOpt's amaxes, no reconstruction
            from saq_deploy.calibrate.modelopt_baseline import apply_modelopt_int8

            apply_modelopt_int8(unet, qcfg, lambda m: [
                f() for f in Records.feeds(m, records.student, groups, T, table=records.table)])
        elif qcfg.act.enabled:
            feeds = Records.feeds(unet, records.student, groups, T, table=records.table)
            init_act_steps(unet, lambda: [f() for f in feeds],
                           method=_act_method(recipe.calibration.method, recipe.quant.act_observer, qcfg.act.bits))
        done, losses = 0, []
        if method.reconstructs:
            _write_ckpt(work, unet, rhash, 0, [])
    loaded.unet = unet
    if method.reconstructs:
        finished = _reconstruct_all(unet, fp_unet, records, recipe, qcfg, work, rhash, done, losses,
                                    progress=progress, max_blocks=max_blocks)
        if not finished:
            return None
    extra = {}
    if method.reconstructs and recipe.reconstruction.network_iters:
        extra["network_stage"] = _network_stage(unet, fp_unet, records, recipe, qcfg, progress=progress)
    return unet, losses, qcfg, extra


def _reconstruct_all(unet, fp_unet, records: Records, recipe: Recipe, qcfg, work: Path, rhash: str,
                     done: int, losses: list, *, progress: bool, max_blocks: int | None) -> bool:
    from saq_deploy.calibrate.blocks import capture
    from saq_deploy.calibrate.reconstruct import reconstruct_block
    from saq_deploy.utils.progress import progress as progress_for

    T, groups = qcfg.num_train_timesteps, qcfg.act.grouping
    w, settings = _mota_weight(recipe), _settings(recipe, qcfg)
    blocks = _blocks(unet, records, groups, T)
    fp_modules = dict(fp_unet.named_modules())
    new_blocks = 0
    with progress_for(progress, "calibrate") as bar:
        task = bar.task("reconstruct", total=len(blocks), completed=done)
        for bi in range(done, len(blocks)):
            if max_blocks is not None and new_blocks >= max_blocks:
                return False
            name, block = blocks[bi]
            inputs = capture(block, Records.feeds(unet, records.student, groups, T, table=records.table),
                             what="input")
            targets = capture(fp_modules[name], Records.feeds(fp_unet, records.target, groups, T, table=records.table),
                              what="output")
            if w < 1.0:  # blended target: the FP block's output at the student's own point mixed in
                same = capture(fp_modules[name], Records.feeds(fp_unet, records.student, groups, T,
                                                               table=records.table), what="output")
                targets = torch.lerp(same, targets, w)
            task.update(description=f"reconstruct {name}")
            res = reconstruct_block(
                block, inputs, targets, records.student[1], settings, seed=recipe.calibration.seed * 100_003 + bi,
                on_iter=lambda it, loss, name=name: task.update(description=f"reconstruct {name} loss {loss:.4g}")
                if it % 25 == 0 else None)
            losses.append({"block": name, **res})
            _write_ckpt(work, unet, rhash, bi + 1, losses)
            task.update(completed=bi + 1)
            new_blocks += 1
    return True


def _mota_weight(recipe: Recipe) -> float:
    return recipe.calibration.mota_weight if get_method(recipe.calibration.method).mota else 1.0


def _settings(recipe: Recipe, qcfg):
    from saq_deploy.calibrate.reconstruct import ReconSettings

    r = recipe.reconstruction
    return ReconSettings(iters=r.iters, batch_size=r.batch_size, lr_round=r.lr_round, lr_act=r.lr_act,
                         round_weight=r.round_weight, beta_start=r.beta_start, beta_end=r.beta_end,
                         warmup=r.warmup, cos_weight=r.cos_weight, timestep_groups=qcfg.act.grouping,
                         num_train_timesteps=qcfg.num_train_timesteps)


def _blocks(unet, records: Records, groups: int, T: int) -> list:
    from saq_deploy.calibrate.blocks import find_blocks

    one = Records.feeds(unet, tuple(v[:2] if v is not None else None for v in records.student), groups, T,
                        table=records.table)[0]
    # stand-alone layers (conv_in, time-embedding MLP, conv_out) keep their nearest rounding and
    # observer scales: their input is the timestep or the image itself, and the authors' PTQ code
    # skips the first and last layers too
    return [(n, b) for n, b in find_blocks(unet, one) if not isinstance(b, tuple(_leaf_types()))]


def _network_stage(unet, fp_unet, records: Records, recipe: Recipe, qcfg, *, progress: bool) -> dict:
    """All reconstructed blocks trained jointly on the final eps (calibrate.network_stage). Seeded as
    the block after the last one would be, so no block's seed is re-used."""
    from saq_deploy.calibrate.network_stage import run_network_stage
    from saq_deploy.calibrate.reconstruct import quant_layers

    blocks = _blocks(unet, records, qcfg.act.grouping, qcfg.num_train_timesteps)
    layers = [layer for _, b in blocks for layer in quant_layers(b)]
    r = recipe.reconstruction
    return run_network_stage(unet, fp_unet, layers, records, _settings(recipe, qcfg), iters=r.network_iters,
                             lr_scale=r.network_lr_scale, mota_weight=_mota_weight(recipe),
                             seed=recipe.calibration.seed * 100_003 + len(blocks), progress=progress)


def _read_ckpt(work: Path, rhash: str) -> dict | None:
    """The checkpoint's facts live in the safetensors header itself (one atomic file): a kill between
    writing it and ``ckpt.json`` (kept for the recipe check in run.py) cannot pair new state with an
    old block count, which would reconstruct a block twice and break byte-identical resume."""
    from safetensors import safe_open

    state = work / CKPT_STATE
    if not state.exists():
        return None
    with safe_open(str(state), framework="pt") as f:
        meta = f.metadata() or {}
    data = json.loads(meta.get("ckpt", "{}"))
    return data if data.get("recipe_hash") == rhash else None


def _write_ckpt(work: Path, unet, rhash: str, blocks_done: int, losses: list) -> None:
    from safetensors.torch import save_file

    from saq_deploy.quant.state import quant_layer_specs, quant_state_dict
    from saq_deploy.utils.distributed import env_world
    from saq_deploy.utils.io import atomic_path, write_json_atomic

    if not env_world().is_rank0:  # the replicas are equal; one writer keeps the file whole
        return
    info = {"recipe_hash": rhash, "blocks_done": blocks_done, "block_losses": losses,
            "layer_specs": quant_layer_specs(unet)}
    with atomic_path(work / CKPT_STATE) as tmp:
        save_file({k: v.contiguous() for k, v in quant_state_dict(unet).items()}, str(tmp),
                  metadata={"ckpt": json.dumps(info, sort_keys=True)})
    write_json_atomic(work / CKPT_INFO, info)


def _restore(fp_unet, qcfg, work: Path, specs: list):
    from safetensors.torch import load_file

    from saq_deploy.quant.state import load_quant_state

    unet = copy.deepcopy(fp_unet)
    load_quant_state(unet, qcfg, load_file(str(work / CKPT_STATE)), specs)
    return unet.eval()
