"""SA-QLoRA and the QLoRA-MSE baseline: quantization-aware LoRA fine-tuning (docs/design/method.md §5).

The quantized UNet gets a LoRA on every main-spec Conv/Linear (W_q = Q(W + B·A), see
`saq_deploy.quant.lora`); keep_8bit layers (conv_in, conv_out, time embedding, ...) stay 8-bit
without LoRA and with their PTQ scales. Trained: LoRA factors, weight scales and activation steps
of the main-spec layers (one step per timestep group when `quant.act_timestep_groups` > 1), with
LSQ gradients; everything else is frozen.

One epoch = one fresh teacher pass per step count N of `qlora.mixstep` (the authors' "mixstep":
the quantized N-step first-order sampler learns to imitate the FP teacher at several N). A pass
draws `batch_size` seeded x_T and labels, runs the FP teacher on the N-step time-quadratic grid
with CFG, and takes ONE optimizer step per sampling step, in sampling order:

- ``sa-qlora`` (MOTA): teacher = FP singlestep DPM-Solver-2. At step i the quantized net's CFG
  eps at the first-order point (x~_{t_{i-1}}, t_{i-1}) is pulled towards the FP eps at the
  intermediate point (u_i, s_i); the trajectory continues along the FP second-order states
  (teacher forcing). ``calibration.orientation = "intermediate_to_outer"`` swaps the two points
  (ablation).
- ``qlora-mse`` (EfficientDM-like): teacher = FP DDIM (the authors' stage 1: FP order 1 vs
  quantized order 1), target = FP eps at the same point; the recipes set cos_weight = 0.

Since the teacher never sees the student, the whole FP pass is run first and its per-step pairs are
then trained on in order: identical to interleaving them. Loss per step = sum-over-elements MSE,
batch mean, + cos_weight · batch mean of (1 − cos). Optimizer: AdamW without weight decay, one
learning rate per layer (relative to the layer's scale, as the authors' LoRA rate = mean step /
2500), linear decay to 0 over all steps, no warm-up. After every epoch the trainable tensors, the
optimizer and the scheduler are checkpointed in the run's ``.partial`` folder, so a re-run
resumes at the last finished epoch and ends bit-identical (CPU). At the end LoRA is merged and the
integer codes fixed by nearest rounding on the learned scales (`merge_lora_`).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saq_deploy.calibrate.methods import get_method
from saq_deploy.calibrate.recipe import Recipe, quant_config_for
from saq_deploy.calibrate.steps import CKPT_INFO
from saq_deploy.errors import ConfigError
from saq_deploy.utils import distributed

CKPT_TENSORS = "qlora_ckpt.pt"
DEPLOYMENT_NOTES = {
    "w4a4": ("W4A4 is a fake-quant research mode, checked through ONNX Runtime only: TensorRT has no INT4 "
             "activations (W4A4 would need NVFP4 on Blackwell)."),
    "w4a8": ("W4A8 deploys on TensorRT as INT4 weight-only GEMMs (Linear, blocked scales) plus INT8 "
             "convolutions (4-bit conv codes exported as INT8 values; TensorRT has no INT4 convs)."),
}

Pair = tuple[Tensor, float, Tensor]  # student x, student timestep, FP target eps


def teacher_sampler(method: str, teacher: str) -> str:
    """The FP trajectory: DPM-Solver-2 for sa-qlora (MOTA), DDIM for qlora-mse, unless set."""
    if teacher != "auto":
        return teacher
    return "dpm-solver-2" if get_method(method).mota else "ddim"


@torch.no_grad()
def teacher_pairs(fp_eps_model, schedule, x_T: Tensor, cond: Tensor | None, steps: int, *, spacing: str,
                  teacher: str, target: str, orientation: str = "outer_to_intermediate",
                  mota_weight: float = 1.0) -> list[Pair]:
    """Run the FP ``teacher`` sampler from ``x_T`` and return one training pair per sampling step.

    ``fp_eps_model`` is the (CFG-wrapped) FP EpsModel. ``target = "intermediate"`` (sa-qlora):
    student at the outer point (x~_{t_{i-1}}, t_{i-1}), target = FP eps at DPM-Solver-2's (u_i, s_i)
    (reversed with ``orientation = "intermediate_to_outer"``). ``target = "same_point"``
    (qlora-mse): target = FP eps at the student's own outer point. ``mota_weight`` w < 1 (intermediate
    targets only): the blended target (1 - w) FP eps at the student's point + w FP eps at the other."""
    from saq_deploy.calibrate.trajectory import _record, outer_grid
    from saq_deploy.samplers.registry import run_sampler

    # Not generate(): x_T and labels are this pass's own draw (epoch_batch: per-pass seed, permuted
    # labels), a rank keeps a row slice of the ONE batch an optimizer step trains on (generate()
    # splits by whole batches), and fp_eps_model is already CFG-wrapped. The grid is the recorder's.
    grid = outer_grid(teacher, steps, schedule, spacing)
    records: list[dict[str, Tensor]] = []
    run_sampler(teacher, fp_eps_model, x_T.clone(), schedule, steps, cond=cond, timesteps=grid,
                callback=lambda info: records.append(_record(teacher, schedule, info)))
    pairs: list[Pair] = []
    for r in records:
        if target == "same_point":
            pairs.append((r["x_outer"], float(r["t_outer"][0]), r["eps_outer"]))
        elif orientation == "intermediate_to_outer":
            pairs.append((r["x_inter"], float(r["t_inter"][0]), _blend(r["eps_inter"], r["eps_outer"], mota_weight)))
        else:
            pairs.append((r["x_outer"], float(r["t_outer"][0]), _blend(r["eps_outer"], r["eps_inter"], mota_weight)))
    return pairs


def _blend(own: Tensor, other: Tensor, w: float) -> Tensor:
    # w = 1 returns the MOTA target itself (bit-identical to the unblended method)
    return other if w == 1.0 else torch.lerp(own, other, w)


def student_eps(unet: nn.Module, x: Tensor, t: float, labels: Tensor | None, null_label: int | None,
                cfg: float, groups: int, num_train_timesteps: int, table: Tensor | None = None) -> Tensor:
    """The quantized UNet's CFG-combined eps at (x, t), with autograd (one batched [uncond; cond]
    call, the same arithmetic as ClassifierFreeGuidance over FakeQuantEpsModel). ``table``: a text
    UNet's prompt embedding rows, which ``labels`` index (calibrate.prompts). Not that wrapper nor
    generate(): EpsModels run under no_grad, and the timestep-group context must wrap the UNet call."""
    from saq_deploy.models.eps_model import cond_kwargs
    from saq_deploy.quant.timestep import active_timesteps, timestep_groups

    b = x.shape[0]
    guided = labels is not None and null_label is not None and cfg != 1.0
    xin = torch.cat([x, x]) if guided else x
    lab = torch.cat([torch.full_like(labels, null_label), labels]) if guided else labels
    tt = torch.full((xin.shape[0],), t, dtype=torch.float32)
    with active_timesteps(timestep_groups(tt, groups, num_train_timesteps)):
        cond = {"class_labels": None} if lab is None else cond_kwargs(lab, table, unet)
        out = unet(xin, tt, **cond, return_dict=False)[0]
    if not guided:
        return out
    eps_u, eps_c = out[:b], out[b:]
    return eps_u + cfg * (eps_c - eps_u)


def qlora_loss(eps_q: Tensor, target: Tensor, cos_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mse, 1 - cos): squared error summed over elements, batch mean, plus cos_weight times
    the batch mean of 1 - cosine similarity (direction term, method.md §2.3)."""
    mse = (eps_q - target).pow(2).flatten(1).sum(1).mean()
    cos = (1 - F.cosine_similarity(eps_q.flatten(1), target.flatten(1), dim=1)).mean()
    return mse + cos_weight * cos, mse, cos


def step_weights(schedule, grid: Tensor, mode: str) -> list[float]:
    """Per-step loss weights. ``uniform``: 1 (the authors). ``state``: max(1, c^2) with
    c = sigma_s - alpha_s sigma_t / alpha_t, the factor by which the first-order step t -> s turns an
    eps error into an error of the next state. At t = T, alpha_t ~ 0.006 makes |c| ~ 4 on a 10-step
    grid: a W4A4 eps error there alone lifts digit-FID from ~23 to ~125 (quality_findings.md), yet
    uniform weighting gives that step 1/N of the loss. The floor at 1 keeps the late steps' weight."""
    if mode == "uniform":
        return [1.0] * (len(grid) - 1)
    t, s = grid[:-1].double(), grid[1:].double()
    c = schedule.sigma(s) - schedule.alpha(s) * schedule.sigma(t) / schedule.alpha(t)
    return [max(1.0, float(v) ** 2) for v in c]


def epoch_batch(seed: int, epoch: int, index: int, n: int, shape: tuple[int, ...],
                num_classes: int | None) -> tuple[Tensor, Tensor | None]:
    """Seeded x_T and labels of pass ``index`` in ``epoch`` (independent of resume and order);
    labels cycle through a seeded permutation of the classes."""
    from saq_deploy.generate import initial_noise

    s = seed * 1_000_003 + epoch * 1_009 + index
    x_T = initial_noise(shape, n, s)
    if num_classes is None:
        return x_T, None
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(s + 7))
    return x_T, perm.repeat(n // num_classes + 1)[:n]


def _prepare(loaded, recipe: Recipe, ds, qcfg):
    """Fresh fake-quant UNet with act steps from the data, LoRA attached, and its trainables."""
    from saq_deploy.calibrate.steps import Records, _act_method
    from saq_deploy.quant.api import quantize_
    from saq_deploy.quant.fake_quant import quant_layers
    from saq_deploy.quant.lora import attach_lora_, trainable_parameters
    from saq_deploy.quant.observers import init_act_steps

    unet = loaded.unet
    quantize_(unet, qcfg)
    if qcfg.act.enabled:
        records = Records(ds, recipe, loaded.null_label, loaded.cond_table)
        feeds = Records.feeds(unet, records.student, qcfg.act.grouping, qcfg.num_train_timesteps,
                              table=records.table)
        init_act_steps(unet, lambda: [f() for f in feeds],
                       method=_act_method(recipe.calibration.method, recipe.quant.act_observer, qcfg.act.bits))
    q = recipe.qlora
    names = [n for n in quant_layers(unet) if qcfg.rule_for(n) == "main"]
    attach_lora_(unet, names, q.rank, q.alpha, q.seed)
    # keep_8bit layers (conv_in, conv_out, time embedding, shortcuts) keep their PTQ scales and
    # steps untrained, as SA-PTQ's stand-alone layers do. conv_in's input is the noisy image
    # itself: a trained (shrunk) LSQ step there clipped the rare |x_T| > 3.5 values seen at
    # batch 8, the eps at t = 999 saturated, and x0 = (x - sigma eps) / alpha with alpha ~ 0.006
    # blew the error up 150x -- every sample collapsed (digit-FID > 1,000) while the loss fell.
    frozen = [n for n in quant_layers(unet) if qcfg.rule_for(n) != "main"]
    return unet.eval(), names, trainable_parameters(unet, frozen)


def _optimizer(unet: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe, total_steps: int):
    """AdamW (no weight decay), per-layer rates relative to the layer's scale; linear decay."""
    from saq_deploy.quant.fake_quant import ActQuantizer, quant_layers

    q = recipe.qlora
    groups = []

    def add(ps: list[nn.Parameter], lr: float) -> None:
        if lr > 0:
            groups.append({"params": ps, "lr": lr})
        else:  # not trained at all: no gradient either
            for p in ps:
                p.requires_grad_(False)

    for layer in quant_layers(unet).values():
        s_mean = float(layer.weight_quant.scale.detach().mean())
        lora = layer._modules.get("lora")
        if lora is not None:
            add([lora.down, lora.up], q.lr * s_mean)
        add([layer.weight_quant.scale], q.lr_scale * s_mean)
    for m in unet.modules():
        if isinstance(m, ActQuantizer) and m.initialized:
            add([m.step], q.lr_act * float(m.step.detach().abs().max()))
    for name in [n for n, p in params.items() if not p.requires_grad]:
        del params[name]
    if not groups:
        raise ConfigError("qlora: lr, lr_scale and lr_act are all 0 (or the model has nothing to train)")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1.0 - it / max(total_steps, 1)))
    return opt, sched


def _read_ckpt(work: Path, rhash: str) -> dict | None:
    info_path, tensors = work / CKPT_INFO, work / CKPT_TENSORS
    if not info_path.exists() or not tensors.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe_hash") != rhash:
        return None
    data = torch.load(tensors, map_location="cpu", weights_only=True)
    # the tensors are written first, the json last: a kill between the two leaves the tensors one
    # epoch ahead. They hold everything a resume needs (history included) and were written by this
    # recipe's run (the json's hash says so), so resume from them instead of starting over.
    if data.get("epochs_done") not in (info.get("epochs_done"), info.get("epochs_done", -2) + 1):
        return None
    return data


def _write_ckpt(work: Path, rhash: str, epochs_done: int, params: dict[str, nn.Parameter], opt, sched,
                history: list[dict], train_s: float) -> None:
    from saq_deploy.utils.distributed import env_world
    from saq_deploy.utils.io import atomic_path, write_json_atomic

    if not env_world().is_rank0:  # the replicas are equal; one writer keeps the file whole
        return
    data = {"epochs_done": epochs_done, "params": {n: p.detach().clone() for n, p in params.items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(), "history": history, "train_s": train_s}
    with atomic_path(work / CKPT_TENSORS) as tmp:
        torch.save(data, tmp)
    write_json_atomic(work / CKPT_INFO, {"recipe_hash": rhash, "method": "qlora", "epochs_done": epochs_done,
                                         "history": history, "train_s": round(train_s, 2)})


def run_qlora(loaded, recipe: Recipe, ds, work: Path, rhash: str, *, progress: bool = False,
              max_epochs: int | None = None):
    """Fine-tune ``loaded.unet`` (quantized in place). Returns (unet, quant config, manifest info),
    or None when stopped after ``max_epochs`` new epochs (checkpoint kept for resume)."""
    from saq_deploy.calibrate.trajectory import outer_grid
    from saq_deploy.models.eps_model import IndexedCondEpsModel, TorchEpsModel
    from saq_deploy.models.guidance import ClassifierFreeGuidance
    from saq_deploy.quant.lora import clamp_positive_, merge_lora_
    from saq_deploy.quant.quantizer import batch_share
    from saq_deploy.utils.progress import progress as progress_for

    c, q = recipe.calibration, recipe.qlora
    schedule = loaded.schedule()
    T = schedule.num_train_timesteps
    qcfg = quant_config_for(recipe, T)
    groups = qcfg.act.grouping
    fp_unet = copy.deepcopy(loaded.unet).eval()
    for p in fp_unet.parameters():
        p.requires_grad_(False)
    guided = loaded.num_classes is not None and loaded.null_label is not None and c.cfg != 1.0
    fp_eps = TorchEpsModel(fp_unet)
    if loaded.cond_table is not None:  # a text UNet: labels are prompt indices (calibrate.prompts)
        fp_eps = IndexedCondEpsModel(fp_eps, loaded.cond_table)
    fp_eps = ClassifierFreeGuidance(fp_eps, c.cfg, loaded.null_label) if guided else fp_eps
    teacher = teacher_sampler(c.method, q.teacher)
    target = "intermediate" if get_method(c.method).mota else "same_point"

    unet, lora_names, params = _prepare(loaded, recipe, ds, qcfg)
    per_epoch = sum(q.mixstep)
    weights = {n: step_weights(schedule, outer_grid(teacher, n, schedule, c.spacing), q.step_weight)
               for n in set(q.mixstep)}
    opt, sched = _optimizer(unet, params, recipe, q.epochs * per_epoch)
    ckpt = _read_ckpt(work, rhash)
    world = distributed.world()
    distributed.barrier("checkpoint read")  # every rank resumes from the same checkpoint before rank 0 writes
    if world.size > q.batch_size:
        raise ConfigError(f"qlora.batch_size = {q.batch_size} is smaller than the {world.size} ranks: each rank "
                          "trains on a slice of every step's batch; raise it or use fewer ranks")
    # data parallel: every rank draws the whole seeded batch and keeps its slice; a rank's batch-mean
    # loss times its share of the batch sums over the ranks to the global mean, so the all-reduced
    # gradient is the one-process gradient (up to float summation order)
    mine = distributed.shard_range(q.batch_size, world)
    share = len(mine) / q.batch_size
    trained = [p for g in opt.param_groups for p in g["params"]]
    if ckpt is None:
        start, history, train_s = 0, [], 0.0
        _write_ckpt(work, rhash, 0, params, opt, sched, history, train_s)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt["params"][name])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start, history, train_s = ckpt["epochs_done"], ckpt["history"], ckpt["train_s"]
    loaded.unet = unet
    with progress_for(progress, "calibrate") as bar:
        task = bar.task(c.method, total=q.epochs * per_epoch, completed=start * per_epoch)
        for epoch in range(start, q.epochs):
            if max_epochs is not None and epoch - start >= max_epochs:
                return None
            t0, sums, n = time.perf_counter(), [0.0, 0.0, 0.0], 0
            for index, steps in enumerate(q.mixstep):
                x_T, labels = epoch_batch(q.seed, epoch, index, q.batch_size, loaded.sample_shape,
                                          loaded.num_classes)
                if world.active:
                    x_T, labels = x_T[mine.start:mine.stop], None if labels is None else labels[mine.start:mine.stop]
                pairs = teacher_pairs(fp_eps, schedule, x_T, labels, steps, spacing=c.spacing, teacher=teacher,
                                      target=target, orientation=c.orientation,
                                      mota_weight=0.0 if epoch < q.same_point_epochs else c.mota_weight)
                for (x, t, tgt), w in zip(pairs, weights[steps], strict=True):
                    with torch.enable_grad(), batch_share(share if world.active else 1.0):
                        eps = student_eps(unet, x, t, labels, loaded.null_label, c.cfg, groups, T,
                                          loaded.cond_table)
                        loss, mse, cos = qlora_loss(eps, tgt, q.cos_weight)
                        if world.active:
                            loss, mse, cos = loss * share, mse * share, cos * share
                        opt.zero_grad(set_to_none=True)
                        (loss * w).backward()
                        distributed.all_reduce_grads_(trained, "QLoRA gradient all-reduce")
                        opt.step()
                        sched.step()
                    clamp_positive_(params)
                    logged = torch.stack([loss.detach(), mse.detach(), cos.detach()])
                    distributed.all_reduce_sum_([logged], "QLoRA loss all-reduce")  # the global batch's
                    for k, v in enumerate(logged):
                        sums[k] += float(v)
                    n += 1
                    task.advance(1, description=f"{c.method} epoch {epoch + 1}/{q.epochs} "
                                                f"N={steps} loss {float(logged[0]):.4g}")
            train_s += time.perf_counter() - t0
            history.append({"epoch": epoch + 1, "loss": sums[0] / n, "mse": sums[1] / n, "one_minus_cos": sums[2] / n,
                            "seconds": round(time.perf_counter() - t0, 2)})
            _write_ckpt(work, rhash, epoch + 1, params, opt, sched, history, train_s)
    merge_lora_(unet)
    info = {
        "method": c.method, "teacher": teacher,
        "target": "fp_intermediate" if target == "intermediate" else "fp_same_point",
        "orientation": c.orientation if target == "intermediate" else None,
        "mota_weight": c.mota_weight if target == "intermediate" else None,
        "same_point_epochs": q.same_point_epochs if target == "intermediate" else None,
        "rank": q.rank, "alpha": q.alpha, "lr": q.lr, "lr_scale": q.lr_scale, "lr_act": q.lr_act,
        "epochs": q.epochs, "mixstep": list(q.mixstep), "optimizer_steps": q.epochs * per_epoch,
        "cos_weight": q.cos_weight, "step_weight": q.step_weight, "batch_size": q.batch_size, "seed": q.seed,
        "lora_layers": len(lora_names), "trainable_tensors": len(params),
        "trainable_params": int(sum(p.numel() for p in params.values())),
        "no_lora_8bit": [p for p in qcfg.keep_8bit],
        "finetune_s": round(train_s, 2), "loss_history": history,
    }
    return unet, qcfg, info


def report_lines(info: dict) -> list[str]:
    """Markdown lines for the artifact's report.md."""
    h = info["loss_history"]
    lines = [(f"- fine-tuning: {info['method']}, teacher {info['teacher']}, target {info['target']}, LoRA rank "
             f"{info['rank']} on {info['lora_layers']} layers, {info['epochs']} epochs × mixstep "
             f"{info['mixstep']} = {info['optimizer_steps']} optimizer steps, {info['finetune_s']:.1f} s"), ""]
    if h:
        lines += ["| epoch | loss | MSE | 1 − cos |", "|---|---|---|---|"]
        lines += [f"| {e['epoch']} | {e['loss']:.4g} | {e['mse']:.4g} | {e['one_minus_cos']:.4g} |" for e in h]
    return lines
