"""Dual-order calibration data (docs/design/method.md §3): FP sampler trajectories recorded via the callback.

For each seeded x_T the full-precision model (with classifier-free guidance) is run once and every
outer step i gives one record per sample (layout in :mod:`saq_deploy.calibrate.dataset`):

- ``dpm-solver-2`` (MOTA, method.md §2): singlestep DPM-Solver-2 with r1 = 1/2. Student point = the outer
  point (x~_{t_{i-1}}, t_{i-1}); target = FP eps at the intermediate point (u_i, s_i). The
  trajectory follows the FP second-order states (teacher forcing), so x_outer of step i+1 is the
  DPM-Solver-2 update of step i. A quantized DDIM step that outputs eps_inter at the outer point
  reproduces the FP second-order step (method.md §1.4).
- ``plms`` (method.md §6): FP PLMS. Student point = (x_t, t); target = the combined direction eps'_t the PLMS
  step actually used (Adams-Bashforth, improved Euler in the warm-up step), recovered from the
  step's x_from -> x_to through the DDIM update identity. There is no separate intermediate input:
  ``x_inter``/``t_inter`` equal the student point, so block-level MOTA degenerates to same-point
  block targets and only the network-output target (eps_inter = eps'_t) carries the high order.
- ``ddim``: FP DDIM on the same outer grid from the same x_T; target = FP eps at the same point
  (the BRECQ / Q-Diffusion-style baseline data).

The pairing (``outer_to_intermediate`` by default, ``intermediate_to_outer`` for the ablation)
only changes which stored fields the data set calls student and target; sampling is identical.
Shards are written to a temporary folder beside ``out_dir`` and renamed at the end, so a failure
(e.g. NaN from the model) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saq_deploy.calibrate.dataset import (
    COND_TABLE_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PAIRINGS,
    RECORD_FIELDS,
    RangeShardWriter,
    ShardWriter,
    TrajectoryDataset,
    merge_fragments,
    pairing_fields,
)
from saq_deploy.errors import ConfigError, SaqError
from saq_deploy.generate import SampleSettings, batch_rows, generate, num_batches
from saq_deploy.samplers import StepInfo, default_grid, intermediate_timesteps
from saq_deploy.schedules.vp import VPSchedule
from saq_deploy.utils.io import fsync_dir, fsync_tree
from saq_deploy.utils.versions import package_versions

if TYPE_CHECKING:
    from saq_deploy.models.eps_model import EpsModel

TRAJECTORY_SAMPLERS: tuple[str, ...] = ("dpm-solver-2", "plms", "ddim")
TARGET_KINDS: dict[str, str] = {
    "dpm-solver-2": "fp_intermediate",  # eps_FP(u_i, s_i)
    "plms": "fp_plms_direction",  # eps'_t, the PLMS combined direction
    "ddim": "fp_same_point",  # eps_FP(x_t, t)
}
_FLOAT_FIELDS = ("x_outer", "t_outer", "eps_outer", "x_inter", "t_inter", "eps_inter")  # causal order


def outer_grid(sampler: str, steps: int, schedule: VPSchedule, spacing: str) -> Tensor:
    """The outer grid a trajectory sampler runs on (N + 1 points, terminal last).

    ``dpm-solver-2`` and ``ddim`` share DPM-Solver-2's default grid (``dpm`` convention, terminal
    0: every step has a finite lambda midpoint), so the DDIM baseline starts from the same x_T on
    the same grid. ``plms`` uses its own default convention. No fixed diffusers stride is applied:
    each step lands on the next grid point (identical to diffusers for ``leading`` spacing).
    """
    name = "plms" if sampler == "plms" else "dpm-solver-2"
    grid, _knobs = default_grid(name, steps, schedule, spacing=spacing)
    return grid


def step_direction(schedule: VPSchedule, x_from: Tensor, x_to: Tensor, t_from: float, t_to: float) -> Tensor:
    """The direction eps' of a first-order-form step, by inverting the DDIM update
    ``x_to = a_t/a_s x_from - (a_t s_s/a_s - s_t) eps'`` (float64 arithmetic, float32 result)."""
    a_s, s_s, _ = schedule.coeffs(t_from)
    a_t, s_t, _ = schedule.coeffs(t_to)
    c = a_t * s_s / a_s - s_t
    if not c > 0.0:
        raise SaqError(f"cannot recover the step direction from t={t_from} to t={t_to} (zero-length step)")
    return (((a_t / a_s) * x_from.double() - x_to.double()) / c).float()


def _record(sampler: str, schedule: VPSchedule, info: StepInfo) -> dict[str, Tensor]:
    """Turn one sampler step into per-sample record fields (no label / sample columns yet)."""
    outer = next(e for e in info.evals if e.role == "outer")
    b = outer.x.shape[0]
    x_o, eps_o = outer.x.detach().float().cpu(), outer.eps.detach().float().cpu()
    t_o = torch.full((b,), float(outer.timestep), dtype=torch.float64)
    inter = next((e for e in info.evals if e.role == "intermediate"), None)
    if sampler == "dpm-solver-2" and inter is not None:
        x_i, eps_i = inter.x.detach().float().cpu(), inter.eps.detach().float().cpu()
        t_i = torch.full((b,), float(inter.timestep), dtype=torch.float64)
    elif sampler == "plms":
        x_i, t_i = x_o, t_o
        if info.t_to == info.t_from:
            # the zero-length last step of a 'leading' / 'linspace' grid (0 -> terminal 0, as
            # diffusers' PNDMScheduler with set_alpha_to_one=False): x_to == x_from, so there is no
            # direction to recover and none that moves the sample; the FP eps there stands in
            eps_i = eps_o
        else:
            eps_i = step_direction(schedule, info.x_from.cpu(), info.x_to.cpu(), info.t_from, info.t_to)
    else:  # ddim, or a DPM-Solver-2 step taken first-order (into CLEAN): its direction is eps_outer
        x_i, t_i, eps_i = x_o, t_o, eps_o
    return {"x_outer": x_o, "t_outer": t_o, "x_inter": x_i, "t_inter": t_i,
            "eps_outer": eps_o, "eps_inter": eps_i, "step": torch.full((b,), info.index, dtype=torch.long)}


def _check_finite(rec: dict[str, Tensor], info: StepInfo) -> None:
    for name in _FLOAT_FIELDS:
        if not bool(torch.isfinite(rec[name]).all()):
            raise SaqError(f"non-finite values (NaN/inf) in {name} at step {info.index} "
                           f"(t={info.t_from:.3f}); no trajectory data was written")


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` over records: a bar on a terminal, rate-limited log lines elsewhere, or a no-op."""
    from saq_deploy.utils.progress import progress

    with progress(enabled, "calibrate", transient=True) as p:
        yield p.task("collect trajectories", total=total).advance


def _validate(sampler: str, pairing: str, num_samples: int, batch_size: int, shard_size: int, cfg: float) -> None:
    if sampler not in TRAJECTORY_SAMPLERS:
        raise ConfigError(f"unknown trajectory sampler {sampler!r}; valid: {', '.join(TRAJECTORY_SAMPLERS)}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; valid: {', '.join(PAIRINGS)}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0):
        raise ConfigError(f"cfg must be a finite number >= 0, got {cfg!r}")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pass overwrite=True to replace it")


def _remove_stale_temps(out: Path) -> None:
    """A kill -9 during collection leaves ``.<out>.*.tmp`` (or ``.<out>.old.*``) beside ``out``; shards
    are only trusted once renamed into place, so those folders are garbage: remove them and say so."""
    for stale in sorted(out.parent.glob(f".{out.name}.*")):
        if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name.startswith(f".{out.name}.old.")):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed stale temp folder {stale} from an interrupted run", file=sys.stderr)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out`` (moving an old one aside first)."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "data")
    fsync_tree(tmp)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def collect_trajectories(
    eps_model: EpsModel,
    schedule: VPSchedule,
    out_dir: str | Path,
    *,
    num_samples: int,
    steps: int,
    seed: int = 0,
    cfg: float = 1.5,
    num_classes: int | None,
    null_label: int | None,
    sample_shape: Sequence[int],
    sampler: str = "dpm-solver-2",
    spacing: str = "quadratic",
    batch_size: int = 32,
    shard_size: int = 256,
    pairing: str = "outer_to_intermediate",
    model_hash: str = "",
    progress: bool = False,
    overwrite: bool = False,
    cond_table: Tensor | None = None,
) -> TrajectoryDataset:
    """Run the FP ``sampler`` from ``num_samples`` seeded x_T and write one record per sample per
    outer step to ``out_dir`` (``num_samples * steps`` records); return the opened data set.

    x_T is :func:`~saq_deploy.generate.initial_noise` with ``seed`` (so ``batch_size`` never changes
    the data); labels cycle through the classes. Guidance wraps ``eps_model`` in
    :class:`ClassifierFreeGuidance` when the model is class-conditional and ``cfg != 1``; recorded
    eps values are then the combined eps_u + cfg (eps_c - eps_u). An existing non-empty
    ``out_dir`` is replaced only with ``overwrite=True``. ``cond_table`` (a text UNet, whose
    ``eps_model`` takes prompt indices as its cond; ``num_classes`` = prompts) is stored with the
    shards so the ``label`` column's prompt indices stay resolvable.
    """
    _validate(sampler, pairing, num_samples, batch_size, shard_size, cfg)
    guided = num_classes is not None and cfg != 1.0
    if guided and null_label is None:  # fail before any folder is made, in this function's terms
        raise ConfigError("classifier-free guidance needs the model's null label; use cfg=1 for none")
    grid = outer_grid(sampler, steps, schedule, spacing)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    shape = tuple(int(s) for s in sample_shape)
    # generate() draws x_T (initial_noise(seed), so batch_size never changes the data), cycles the
    # labels and wraps CFG, exactly as sampling does; the sampler runs on ``grid`` as given
    settings = SampleSettings(sampler=sampler, steps=steps, cfg=cfg, seed=seed, n=num_samples,
                              spacing=spacing, batch_size=batch_size)

    from saq_deploy.utils import distributed

    w = distributed.world()
    tmp_name = None
    if w.is_rank0:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        tmp_name = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    # one temp folder for all ranks (a shared file system): each rank writes its own shards into it
    tmp = Path(distributed.broadcast_object(tmp_name, "trajectory set-up"))
    # the unit of work is one batch of the single-process run, so every sample is computed in the
    # same batch as there, and a rank's records are one contiguous stretch of the record stream
    mine = distributed.shard_range(num_batches(num_samples, batch_size), w)
    rows = batch_rows(num_samples, batch_size, mine)
    try:
        error: BaseException | None = None
        if w.active:
            writer = RangeShardWriter(tmp, shard_size, rows.start * steps, rows.stop * steps, num_samples * steps)
        else:
            writer = ShardWriter(tmp, shard_size)
        try:
            with _progress(progress, len(rows) * steps) as advance:

                def recorder(sl: slice, cond: Tensor | None) -> Callable[[StepInfo], None]:
                    """The step callback of the batch of samples ``sl``: one record per sample per step."""
                    b = sl.stop - sl.start
                    label_col = torch.full((b,), -1, dtype=torch.long) if cond is None else cond.clone()
                    sample_col = torch.arange(sl.start, sl.stop, dtype=torch.long)

                    def on_step(info: StepInfo) -> None:
                        rec = _record(sampler, schedule, info)
                        _check_finite(rec, info)
                        rec["label"], rec["sample"] = label_col, sample_col
                        writer.add({k: rec[k] for k in RECORD_FIELDS})
                        advance(len(sample_col))

                    return on_step

                generate(eps_model, schedule, shape, settings, num_classes=num_classes, null_label=null_label,
                         timesteps=grid, batches=mine, step_callback_for=recorder)
            pieces = writer.close()
        except Exception as e:  # noqa: BLE001 - re-raised by agree(); the others must not wait for it
            error = e
        distributed.agree(error, "trajectory collection")
        pieces = distributed.all_gather_objects(pieces, "trajectory shard lists")
        if w.is_rank0:
            try:
                error = None
                shards = merge_fragments(tmp, [p for ps in pieces for p in ps]) if w.active else pieces[0]
                _finish(tmp, out, cond_table, _manifest(
                    sampler=sampler, pairing=pairing, steps=steps, spacing=spacing, grid=grid, schedule=schedule,
                    seed=seed, num_samples=num_samples, cfg=cfg, guided=guided,
                    num_classes=num_classes, null_label=null_label, model_hash=model_hash, sample_shape=shape,
                    batch_size=batch_size, shard_size=shard_size, shards=shards))
            except Exception as e:  # noqa: BLE001 - re-raised by agree() below, on every rank
                error = e
        distributed.agree(error, "writing the trajectory manifest")
    except BaseException:
        if w.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrajectoryDataset(out)


def _finish(tmp: Path, out: Path, cond_table: Tensor | None, manifest: dict[str, Any]) -> None:
    """Rank 0: the prompt table, the manifest over every rank's shards, and the rename into place."""
    table_entry = None
    if cond_table is not None:
        from safetensors.torch import save_file

        from saq_deploy.utils.io import sha256_file

        save_file({"table": cond_table.contiguous()}, str(tmp / COND_TABLE_FILE))
        table_entry = {"file": COND_TABLE_FILE, "rows": int(cond_table.shape[0]),
                       "sha256": sha256_file(tmp / COND_TABLE_FILE)}
    if table_entry is not None:
        manifest["cond_table"] = table_entry
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the data set should be readable like any folder
    _install(tmp, out)


def _manifest(
    *,
    sampler: str,
    pairing: str,
    steps: int,
    spacing: str,
    grid: Tensor,
    schedule: VPSchedule,
    seed: int,
    num_samples: int,
    cfg: float,
    guided: bool,
    num_classes: int | None,
    null_label: int | None,
    model_hash: str,
    sample_shape: tuple[int, ...],
    batch_size: int,
    shard_size: int,
    shards: list[dict[str, Any]],
) -> dict[str, Any]:
    grid_list = [float(t) for t in grid.tolist()]
    inter = intermediate_timesteps(schedule, grid) if sampler == "dpm-solver-2" else grid_list[:-1]
    student, target = pairing_fields(pairing)
    per_record = list(sample_shape)
    fields = {
        "x_outer": ("float32", per_record), "t_outer": ("float64", []),
        "x_inter": ("float32", per_record), "t_inter": ("float64", []),
        "label": ("int64", []), "eps_outer": ("float32", per_record), "eps_inter": ("float32", per_record),
        "step": ("int64", []), "sample": ("int64", []),
    }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sampler": sampler,
        "pairing": pairing,
        "target_kind": TARGET_KINDS[sampler],
        "student_fields": list(student),
        "target_fields": list(target),
        "steps": steps,
        "spacing": spacing,
        "grid": grid_list,
        "intermediate_timesteps": inter,
        "seed": seed,
        "num_samples": num_samples,
        "cfg": float(cfg),
        "guided": guided,
        "num_classes": num_classes,
        "null_label": null_label,
        "model_hash": model_hash,
        "sample_shape": per_record,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "num_records": sum(int(s["records"]) for s in shards),
        "fields": {k: {"dtype": d, "shape": s} for k, (d, s) in fields.items()},
        "shards": shards,
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
