"""Block reconstruction (BRECQ / Q-Diffusion style, and SA-PTQ's MOTA variant).

For one block: AdaRound rounding variables and LSQ activation steps are trained so the quantized
block, fed the inputs it sees in the partially quantized network at the *student* points, matches
the FP block's output at the *target* points. brecq: target = same point; sa-ptq: target = the
DPM-Solver-2 intermediate point (MOTA). Only rounding variables and activation steps are trained;
the FP weights never change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saq_deploy.calibrate.blocks import BlockInputs, block_output
from saq_deploy.quant.timestep import active_timesteps
from saq_deploy.utils import distributed


@dataclass(frozen=True)
class ReconSettings:
    iters: int
    batch_size: int
    lr_round: float
    lr_act: float
    round_weight: float
    beta_start: float
    beta_end: float
    warmup: float
    cos_weight: float
    timestep_groups: int = 1
    num_train_timesteps: int = 1000


def quant_layers(block: nn.Module) -> list[nn.Module]:
    from saq_deploy.quant.fake_quant import QuantConv2d, QuantLinear

    return [m for m in block.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def rec_loss(out: Tensor, target: Tensor) -> Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest."""
    return (out - target).pow(2).sum(1).mean()


def cos_loss(out: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity per sample (direction term of the MOTA loss), batch mean."""
    return (1 - torch.nn.functional.cosine_similarity(out.flatten(1), target.flatten(1), dim=1)).mean()


def _groups(t: Tensor, s: ReconSettings) -> Tensor:
    from saq_deploy.quant.timestep import timestep_groups

    return timestep_groups(t, s.timestep_groups, s.num_train_timesteps)


def _forward(block: nn.Module, args, kwargs, t: Tensor, s: ReconSettings) -> Tensor:
    with active_timesteps(_groups(t, s)):
        return block_output(block(*args, **kwargs))


@torch.no_grad()
def block_loss(block: nn.Module, inputs: BlockInputs, targets: Tensor, timesteps: Tensor,
               s: ReconSettings, chunk: int = 256) -> float:
    """Mean reconstruction loss of the block as it is now (for the before/after report)."""
    total, n = 0.0, 0
    for idx, args, kwargs in inputs.chunks(chunk):
        out = _forward(block, args, kwargs, timesteps[idx], s)
        total += rec_loss(out, targets[idx]).item() * len(idx)
        n += len(idx)
    return total / max(n, 1)


def _data_loss(block: nn.Module, inputs: BlockInputs, idx: Tensor, targets: Tensor, timesteps: Tensor,
               s: ReconSettings) -> Tensor:
    args, kwargs = inputs.select(idx)
    out = _forward(block, args, kwargs, timesteps[idx], s)
    loss = rec_loss(out, targets[idx])
    if s.cos_weight > 0:
        loss = loss + s.cos_weight * cos_loss(out, targets[idx])
    return loss


def reconstruct_block(block: nn.Module, inputs: BlockInputs, targets: Tensor, timesteps: Tensor,
                      s: ReconSettings, *, seed: int, on_iter=None) -> dict[str, float]:
    """Train the block's rounding variables and activation steps; end with hard rounding.

    ``timesteps`` (N,) are the UNet timesteps of the student inputs (for timestep-group scales).
    Deterministic for a given ``seed`` on CPU, which makes resume bit-identical."""
    layers = quant_layers(block)
    before = block_loss(block, inputs, targets, timesteps, s)
    if not layers or s.iters == 0:
        return {"loss_before": before, "loss_after": before, "iters": 0}
    for layer in layers:
        layer.weight_quant.start_adaround(layer.fp_weight())
    train_rounding(block, layers, inputs.n, lambda idx: _data_loss(block, inputs, idx, targets, timesteps, s), s,
                   seed=seed, on_iter=on_iter)
    after = block_loss(block, inputs, targets, timesteps, s)
    return {"loss_before": before, "loss_after": after, "iters": s.iters}


def train_rounding(module: nn.Module, layers: list[nn.Module], n: int, data_loss, s: ReconSettings, *,
                   seed: int, on_iter=None) -> None:
    """AdaRound + LSQ training of ``layers`` (their AdaRound already started) inside ``module`` on
    ``data_loss(idx)``, a batch-mean loss over the records ``idx`` of ``n``; ends with hard rounding.
    Shared by the block stage and the network stage (calibrate.network_stage), so both train the
    same way: the same optimizer groups, regulariser schedule, data-parallel split and step clamp."""
    from saq_deploy.quant.adaround import beta_schedule
    from saq_deploy.quant.quantizer import batch_share

    alphas = [layer.weight_quant.alpha for layer in layers]
    steps = [layer.act_quant.step for layer in layers
             if layer.act_quant is not None and layer.act_quant.initialized]
    groups = [{"params": alphas, "lr": s.lr_round}]
    if s.lr_act > 0:
        # Adam moves a parameter by ~lr per iteration whatever its size, so an absolute lr would
        # rescale a 0.008 step and a 0.1 step alike: use a rate relative to each step's value
        groups += [{"params": [st], "lr": s.lr_act * float(st.detach().abs().max())} for st in steps]
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    w = distributed.world()
    trained = [p for g in groups for p in g["params"]]
    module.train()
    try:
        for it in range(s.iters):
            # every rank draws the same global batch (same generator) and trains on its slice of it
            idx = torch.randint(0, n, (min(s.batch_size, n),), generator=gen)
            share = 1.0
            if w.active:
                mine = distributed.shard_range(len(idx), w)
                share, idx = len(mine) / len(idx), idx[mine.start:mine.stop]
            with torch.enable_grad(), batch_share(share):
                # both losses are batch means: a rank's mean times its share of the batch sums, over
                # the ranks, to the global mean, so the all-reduced gradient is the one-process one
                loss = data_loss(idx) * share if len(idx) else 0.0
                beta, weight = beta_schedule(it, s.iters, start=s.beta_start, end=s.beta_end, warmup=s.warmup)
                if weight > 0 and s.round_weight > 0 and w.is_rank0:  # once, not once per rank
                    reg = sum(layer.weight_quant.round_regularizer(beta) for layer in layers)
                    loss = loss + s.round_weight * weight * reg
                opt.zero_grad(set_to_none=True)
                if isinstance(loss, Tensor):
                    loss.backward()
                distributed.all_reduce_grads_(trained, "rounding / step gradient all-reduce")
                opt.step()
            for st in steps:  # LSQ steps must stay positive (TensorRT: scales > 0)
                st.data.clamp_(min=1e-8)
            if on_iter is not None:
                on_iter(it, float(loss.detach()) if isinstance(loss, Tensor) else loss)
    finally:
        module.eval()
        for layer in layers:
            layer.weight_quant.finish_adaround(layer.fp_weight())
