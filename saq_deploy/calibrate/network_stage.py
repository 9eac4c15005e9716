"""Network-output stage of PTQ reconstruction (docs/design/method.md §4.1).

After the block stage (calibrate.reconstruct), the rounding variables and activation steps of
every reconstructed block are trained *jointly* so the quantized UNet's final eps at the student
points matches the FP eps at the target points: BRECQ's network-wise idea, with the block stage's
own target (sa-ptq: MOTA, the FP eps at the higher-order point, by ``calibration.orientation`` and
blended by ``calibration.mota_weight``; brecq: the FP eps at the same point). Why: each block was
fitted to its own output with the earlier blocks' errors as input, but errors that only show in
how blocks combine (skip connections, the up path re-using down features) are invisible there,
and the sampler consumes the eps, not block outputs.

The stage reuses the block stage's recorded student / target points (``steps.Records``: the same
CFG rows, labels, prompt states and timestep groups) and its training loop (``train_rounding``),
so it is seeded, batched and data-parallel the same way. It is not checkpointed: a run killed
inside it resumes from the block checkpoint and runs the stage again from its seed, which ends
byte-identical (CPU)."""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor, nn

from saq_deploy.calibrate.reconstruct import ReconSettings, cos_loss, rec_loss, train_rounding
from saq_deploy.calibrate.steps import Records

EVAL_BATCH = 128  # records per no-grad UNet call (FP targets, before / after losses): bounds memory
# AdaRound restarts from the block stage's decided codes with h = MARGIN or 1 - MARGIN: inside the
# rectified sigmoid's open range, so every rounding variable still has a gradient (at h = 0 or 1 the
# clamp would freeze it), yet close enough that the soft start is the block-stage network within
# MARGIN of one step per weight; hard rounding of the start gives the block-stage codes back exactly
MARGIN = 1e-3


def _rows(point, idx: Tensor):
    return tuple(None if v is None else v[idx] for v in point)


def unet_eps(unet: nn.Module, point, groups: int, T: int, table: Tensor | None) -> Tensor:
    """The UNet's eps for the records of ``point`` (x, t, labels) in one call (with autograd)."""
    return Records.feeds(unet, point, groups, T, batch=len(point[0]), table=table)[0]()[0]


@torch.no_grad()
def all_eps(unet: nn.Module, point, groups: int, T: int, table: Tensor | None) -> Tensor:
    """The UNet's eps for every record of ``point``, EVAL_BATCH records per call."""
    return torch.cat([f()[0] for f in Records.feeds(unet, point, groups, T, batch=EVAL_BATCH, table=table)])


def network_targets(fp_unet: nn.Module, records: Records, mota_weight: float, groups: int, T: int) -> Tensor:
    """The FP eps the stage trains towards, one row per record, as the block stage forms its block
    targets: at ``records.target`` (sa-ptq: the other-order point; brecq: Records puts the
    student's own point there), lerped with the student's point when ``mota_weight`` < 1."""
    target = all_eps(fp_unet, records.target, groups, T, records.table)
    if mota_weight < 1.0:  # torch.lerp at weight 0 returns the same-point eps exactly (= brecq)
        target = torch.lerp(all_eps(fp_unet, records.student, groups, T, records.table), target, mota_weight)
    return target


def eps_loss(out: Tensor, target: Tensor, cos_weight: float) -> Tensor:
    """The block stage's loss on the final eps: channel-summed squared error (+ the cos term)."""
    loss = rec_loss(out, target)
    return loss + cos_weight * cos_loss(out, target) if cos_weight > 0 else loss


@torch.no_grad()
def network_loss(unet: nn.Module, records: Records, targets: Tensor, s: ReconSettings) -> float:
    """Mean stage loss over all records for the network as it is now (the before / after report)."""
    out = all_eps(unet, records.student, s.timestep_groups, s.num_train_timesteps, records.table)
    total, n = 0.0, len(out)
    for i in range(0, n, EVAL_BATCH):
        sl = slice(i, i + EVAL_BATCH)
        total += float(eps_loss(out[sl], targets[sl], s.cos_weight)) * len(out[sl])
    return total / max(n, 1)


@torch.no_grad()
def resume_adaround(layer: nn.Module) -> None:
    """Soft rounding again, starting from the codes the block stage decided (see MARGIN)."""
    from saq_deploy.quant.adaround import GAMMA, ZETA

    wq, w = layer.weight_quant, layer.fp_weight()
    if wq.codes is None:  # no decided codes (still nearest rounding): start as the block stage does
        wq.start_adaround(w)
        return
    base = torch.floor(w / wq.full_scale(w.shape))
    up = (wq.codes.to(base.dtype) - base).clamp_(0, 1)  # clamped codes sit at qmin / qmax either way
    h = MARGIN + (1 - 2 * MARGIN) * up
    wq.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0))
    wq.codes, wq.mode = None, "soft"


def run_network_stage(unet: nn.Module, fp_unet: nn.Module, layers: list[nn.Module], records: Records,
                      block_settings: ReconSettings, *, iters: int, lr_scale: float, mota_weight: float,
                      seed: int, progress: bool) -> dict:
    """Train ``layers`` (every reconstructed block's) on the final eps; returns the manifest entry."""
    from saq_deploy.utils.progress import progress as progress_for

    t0 = time.perf_counter()
    s = dataclasses.replace(block_settings, iters=iters, lr_round=block_settings.lr_round * lr_scale,
                            lr_act=block_settings.lr_act * lr_scale)
    groups, T = s.timestep_groups, s.num_train_timesteps
    targets = network_targets(fp_unet, records, mota_weight, groups, T)
    before = network_loss(unet, records, targets, s)

    def data_loss(idx: Tensor) -> Tensor:
        return eps_loss(unet_eps(unet, _rows(records.student, idx), groups, T, records.table), targets[idx],
                        s.cos_weight)

    with progress_for(progress, "calibrate") as bar:
        task = bar.task(f"network stage loss {before:.4g}", total=iters)
        for layer in layers:
            resume_adaround(layer)
        train_rounding(unet, layers, len(targets), data_loss, s, seed=seed, on_iter=lambda it, loss: task.update(
            completed=it + 1, description=f"network stage loss {loss:.4g}" if it % 25 == 0 else None))
    after = network_loss(unet, records, targets, s)
    return {"iters": iters, "lr_scale": lr_scale, "layers": len(layers), "records": len(targets),
            "loss_before": before, "loss_after": after, "network_s": round(time.perf_counter() - t0, 2)}


def report_lines(info: dict) -> list[str]:
    """Markdown lines for the artifact's report.md."""
    return [(f"- network stage: {info['iters']} iterations (lr × {info['lr_scale']:g}) on {info['layers']} "
             f"layers, {info['records']} records; final-eps loss {info['loss_before']:.4g} → "
             f"{info['loss_after']:.4g}, {info['network_s']:.1f} s"), ""]
