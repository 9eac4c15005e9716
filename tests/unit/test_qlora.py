"""SA-QLoRA pieces: LoRA merge, what gets gradients, the MOTA pairing on a toy schedule, the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saq_deploy.calibrate.qlora import epoch_batch, qlora_loss, step_weights, student_eps, teacher_pairs
from saq_deploy.calibrate.recipe import QLoRASection, Recipe
from saq_deploy.calibrate.trajectory import outer_grid
from saq_deploy.errors import ConfigError
from saq_deploy.quant import ActSpec, QuantConfig, WeightSpec, init_act_steps, quant_layers, quantize_
from saq_deploy.quant.fake_quant import set_quant_enabled
from saq_deploy.quant.lora import LoRA, attach_lora_, merge_lora_, trainable_parameters
from saq_deploy.quant.quantizer import quantize
from saq_deploy.quant.state import load_quant_state, quant_layer_specs, quant_state_dict
from saq_deploy.schedules import VPSchedule
from tests.helpers import tiny_unet2d

T = 1000
CFG = QuantConfig(WeightSpec(bits=4), ActSpec(bits=8))


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([999.0, 600.0, 250.0, 3.0])[:b], torch.arange(b) % 11


def _quantized(config=CFG, lora_seed=0, random_up=True):
    """Tiny UNet, fake-quantized, act steps from random data, LoRA on the main-spec layers."""
    unet = tiny_unet2d().eval()
    quantize_(unet, config)
    x, t, y = _inputs()
    init_act_steps(unet, lambda: unet(x, t, class_labels=y))
    names = [n for n in quant_layers(unet) if config.rule_for(n) == "main"]
    loras = attach_lora_(unet, names, rank=4, alpha=8.0, seed=lora_seed)
    if random_up:  # B starts at zero (a no-op); make the delta non-zero
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for lora in loras.values():
                lora.up.copy_(0.05 * torch.randn(lora.up.shape, generator=g))
    return unet, names


def _eps(unet):
    x, t, y = _inputs()
    with torch.no_grad():
        return unet(x, t, class_labels=y).sample


def test_lora_starts_as_noop_and_keep_8bit_layers_have_none():
    unet, names = _quantized(random_up=False)
    ref = tiny_unet2d().eval()
    quantize_(ref, CFG)
    x, t, y = _inputs()
    init_act_steps(ref, lambda: ref(x, t, class_labels=y))
    assert torch.equal(_eps(unet), _eps(ref))
    layers = quant_layers(unet)
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert "lora" not in layers[name]._modules and layers[name].weight_quant.bits == 8
    assert names and all(layers[n].weight_quant.bits == 4 and isinstance(layers[n].lora, LoRA) for n in names)


def test_merge_equals_unmerged_forward():
    unet, names = _quantized()
    before = _eps(unet)
    expected_codes = {n: quantize(quant_layers(unet)[n].effective_weight(), quant_layers(unet)[n].weight_quant.scale,
                                  4).detach() for n in names}
    set_quant_enabled(unet, False, False)
    fp_before = _eps(unet)  # quantization off: the FP forward with W + B·A
    set_quant_enabled(unet, True, True)
    assert merged_names(unet) == sorted(names)
    assert torch.equal(_eps(unet), before)  # merged + nearest-rounded codes == unmerged fake-quant forward
    for n in names:
        layer = quant_layers(unet)[n]
        assert "lora" not in layer._modules and layer.lora_merged and layer.weight_quant.mode == "hard"
        assert torch.equal(layer.weight_quant.codes.float(), expected_codes[n])
    set_quant_enabled(unet, False, False)
    assert torch.equal(_eps(unet), fp_before)


def merged_names(unet):
    return sorted(merge_lora_(unet))


def test_conv_lora_is_the_kxk_then_1x1_pair():
    conv = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1)
    lora = LoRA(conv.weight.shape, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.up.normal_()
    x = torch.randn(2, 6, 9, 9)
    down = F.conv2d(x, lora.down.reshape(3, 6, 3, 3), stride=2, padding=1)
    pair = F.conv2d(down, lora.up[:, :, None, None]) * lora.scaling
    assert torch.allclose(F.conv2d(x, lora.delta(), stride=2, padding=1), pair, atol=1e-5)
    assert LoRA((4, 2), rank=32, alpha=32.0).rank == 2  # capped at min(out, fan_in)


def test_gradients_reach_lora_scales_and_steps_only():
    unet, names = _quantized()
    fp_weights = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora." not in n}
    eight_bit = [n for n in quant_layers(unet) if CFG.rule_for(n) != "main"]  # conv_in, conv_out, time MLP, ...
    params = trainable_parameters(unet, eight_bit)
    kinds = {n.rsplit(".", 1)[-1] for n in params}
    assert kinds == {"down", "up", "scale", "step"}
    assert sum(n.endswith(".up") for n in params) == len(names)
    assert {n.rsplit(".", 2)[0] for n in params} == set(names)  # keep_8bit quantizers stay at their PTQ values
    assert "conv_in.act_quant.step" in dict(unet.named_parameters()) and "conv_in.weight_quant.scale" not in params
    x, t, y = _inputs(2)
    eps = student_eps(unet, x, float(t[0]), y, 10, 1.5, 1, T)
    loss, _, _ = qlora_loss(eps, torch.zeros_like(eps), 2.0)
    loss.backward()
    trainable = set(params)
    for name, p in unet.named_parameters():
        if name in trainable:
            assert p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:  # FP weights, biases, norms, embeddings: frozen, no gradient
            assert not p.requires_grad and p.grad is None, name
    for name, buf in unet.named_buffers():
        assert not buf.requires_grad, name
    opt = torch.optim.SGD(params.values(), lr=1e-3)
    opt.step()
    for n, p in unet.named_parameters():
        if n not in trainable:
            assert torch.equal(p, fp_weights[n]), n


def _toy_schedule() -> VPSchedule:
    betas = torch.linspace(1e-4, 0.2, 100, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1.0 - betas, 0))


def _toy_eps(x, t, cond=None):
    tt = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(x) * (0.3 + tt / 100) + 0.05 * torch.sin(tt)


def test_mota_pairing_matches_method_doc_on_toy_schedule():
    """sa-qlora: student = first-order point (x~_{t_{i-1}}, t_{i-1}) on the FP DPM-Solver-2 trajectory,
    target = FP eps at (u_i, s_i); recomputed here from the formulas of docs/design/method.md §1.4."""
    sched = _toy_schedule()
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pairs = teacher_pairs(_toy_eps, sched, x0.float(), None, 4, spacing="quadratic", teacher="dpm-solver-2",
                          target="intermediate")
    grid = [float(v) for v in outer_grid("dpm-solver-2", 4, sched, "quadratic")]
    assert len(pairs) == 4 and [p[1] for p in pairs] == pytest.approx(grid[:-1])
    x = x0.float()
    for i, (xs, ts, target) in enumerate(pairs):
        t_prev, t_next = grid[i], grid[i + 1]
        lam = lambda t: math.log(sched.coeffs(t)[0] / sched.coeffs(t)[1])
        h = lam(t_next) - lam(t_prev)
        s = float(sched.t_from_lam(torch.tensor(lam(t_prev) + h / 2, dtype=torch.float64)))
        (a_p, _, _), (a_s, sig_s, _), (a_n, sig_n, _) = sched.coeffs(t_prev), sched.coeffs(s), sched.coeffs(t_next)
        eps_outer = _toy_eps(x, torch.full((3,), t_prev))
        u = (a_s / a_p) * x - sig_s * math.expm1(h / 2) * eps_outer
        eps_u = _toy_eps(u, torch.full((3,), s))
        assert torch.allclose(xs, x, atol=1e-5) and ts == pytest.approx(t_prev)
        assert torch.allclose(target, eps_u, atol=1e-5)  # FP eps at the intermediate point, not at (x, t)
        assert not torch.allclose(target, eps_outer, atol=1e-3)
        x = (a_n / a_p) * x - sig_n * math.expm1(h) * eps_u  # teacher forcing: FP second-order state

    # ablation orientation: student at (u_i, s_i), target FP eps at the outer point
    rev = teacher_pairs(_toy_eps, sched, x0.float(), None, 4, spacing="quadratic", teacher="dpm-solver-2",
                        target="intermediate", orientation="intermediate_to_outer")
    assert rev[0][1] < grid[0] and torch.allclose(rev[0][2], _toy_eps(x0.float(), torch.full((3,), grid[0])))


def test_same_point_pairing_follows_fp_ddim():
    sched = _toy_schedule()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    pairs = teacher_pairs(_toy_eps, sched, x, None, 3, spacing="quadratic", teacher="ddim", target="same_point")
    grid = [float(v) for v in outer_grid("ddim", 3, sched, "quadratic")]
    for i, (xs, ts, target) in enumerate(pairs):
        assert torch.allclose(xs, x, atol=1e-5) and ts == pytest.approx(grid[i])
        eps = _toy_eps(x, torch.full((2,), grid[i]))
        assert torch.allclose(target, eps, atol=1e-5)
        (a_s, s_s, _), (a_t, s_t, _) = sched.coeffs(grid[i]), sched.coeffs(grid[i + 1])
        x = (a_t / a_s) * x - (a_t * s_s / a_s - s_t) * eps


def test_state_step_weights_are_diffusers_ddim_eps_gain():
    """``state`` weights = max(1, (d x_next / d eps)^2) of a DDIM step; the gain is measured on
    diffusers' DDIMScheduler.step (the oracle), perturbing eps by a constant."""
    from diffusers import DDIMScheduler

    ds = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    ds.set_timesteps(10)  # 900, 800, ..., 0
    sched = VPSchedule.from_diffusers(ds)
    ts = [int(v) for v in ds.timesteps]
    grid = torch.tensor(ts, dtype=torch.float32)
    w = step_weights(sched, grid, "state")
    assert step_weights(sched, grid, "uniform") == [1.0] * (len(ts) - 1)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x)
    for i, t in enumerate(ts[:-1]):
        gain = (ds.step(eps + 1e-3, t, x).prev_sample - ds.step(eps, t, x).prev_sample).mean() / 1e-3
        assert w[i] == pytest.approx(max(1.0, float(gain) ** 2), rel=1e-3)
    assert w[0] == max(w) > 1.5 and w[-1] == 1.0  # the first (t = 900) step dominates; late steps keep 1


def test_loss_terms():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss, mse, cos = qlora_loss(a, b, 2.0)
    assert mse.item() == pytest.approx(((a - b) ** 2).sum().item() / 3, rel=1e-5)
    c = torch.stack([torch.dot(a[i].flatten(), b[i].flatten()) / (a[i].norm() * b[i].norm()) for i in range(3)])
    assert cos.item() == pytest.approx((1 - c).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(mse.item() + 2.0 * cos.item(), rel=1e-6)
    assert qlora_loss(a, a, 5.0)[0].item() == pytest.approx(0.0, abs=1e-5)


def test_epoch_batch_is_seeded_and_balanced():
    x1, y1 = epoch_batch(3407, 2, 1, 10, (1, 8, 8), 10)
    x2, y2 = epoch_batch(3407, 2, 1, 10, (1, 8, 8), 10)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and sorted(y1.tolist()) == list(range(10))
    assert not torch.equal(epoch_batch(3407, 3, 1, 10, (1, 8, 8), 10)[0], x1)


def test_merged_state_round_trips_with_weight_fp():
    unet, names = _quantized()
    merge_lora_(unet)
    state, specs = quant_state_dict(unet), quant_layer_specs(unet)
    assert {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_fp")} == set(names)
    fresh = tiny_unet2d().eval()
    load_quant_state(fresh, CFG, state, specs)
    assert torch.equal(_eps(fresh), _eps(unet))
    for n in names:
        assert torch.equal(quant_layers(fresh)[n].weight, quant_layers(unet)[n].weight)
    bad = {**state, f"{names[0]}.weight_fp": torch.zeros(3)}
    with pytest.raises(ConfigError, match="weight_fp"):
        load_quant_state(tiny_unet2d(), CFG, bad, specs)


def test_qlora_recipe_section():
    r = Recipe().with_overrides({"calibration.method": "sa-qlora", "qlora.epochs": 3, "qlora.mixstep": [5, 10]})
    assert r.qlora.mixstep == (5, 10) and r.to_dict()["qlora"]["epochs"] == 3
    assert Recipe.from_dict(r.to_dict()) == r
    assert "qlora" not in Recipe().to_dict()  # other methods' recipes (and hashes) are unchanged
    for bad in ({"mixstep": []}, {"mixstep": [0]}, {"rank": 0}, {"lr": -1.0}, {"teacher": "plms"}):
        with pytest.raises(ConfigError, match="qlora"):
            QLoRASection(**bad)
