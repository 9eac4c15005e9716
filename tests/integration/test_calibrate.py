"""`saq-deploy calibrate` on the reference model with tiny settings: artifact, resume, bad recipes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe, load_recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError, ModelLoadError, SaqError
from saq_deploy.reference import DIGITS_UNET_DIR

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8}


def tiny(method="sa-ptq", bits="w8a8", **extra) -> Recipe:
    return Recipe().with_overrides({**TINY, "calibration.method": method, "quant.bits": bits, **extra})


@pytest.fixture(scope="module")
def sa_ptq_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "w8a8"
    calibrate(tiny(), out)
    return out


@pytest.mark.slow
def test_artifact_contents_and_round_trip(sa_ptq_artifact):
    out = sa_ptq_artifact
    for name in ("calibrated.safetensors", "manifest.json", "recipe.json", "report.md"):
        assert (out / name).exists(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "sa-ptq" and m["bits"] == "w8a8" and m["sampler"] == "dpm-solver-2"
    assert len(m["model"]["hash"]) == 64 and m["wall_time_s"] > 0
    assert len(m["block_losses"]) >= 25 and all("loss_after" in b for b in m["block_losses"])
    state = load_file(str(out / "calibrated.safetensors"))
    ints = [v for k, v in state.items() if k.endswith("weight_int")]
    assert ints and all(v.dtype == torch.int8 for v in ints)
    # loading twice rebuilds the identical fake-quant model, and it differs from FP
    a, b = load_artifact(out), load_artifact(out)
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([999.0, 500.0, 20.0, 1.0]), torch.tensor([1, 2, 3, 10])
    ea, eb = a.eps_model()(x, t, y), b.eps_model()(x, t, y)
    assert torch.equal(ea, eb)
    fp = a.fp_unet(x, t, class_labels=y).sample
    assert 0 < (ea - fp).abs().max() < 0.5 * fp.abs().max()


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    recipe = tiny(method="brecq")
    full = tmp_path / "full"
    calibrate(recipe, full)
    part = tmp_path / "part"
    calibrate(recipe, part, max_blocks=5)  # "killed" after 5 blocks: checkpoint stays
    assert not part.exists() and (tmp_path / ".part.partial" / "ckpt.json").exists()
    assert json.loads((tmp_path / ".part.partial" / "ckpt.json").read_text())["blocks_done"] == 5
    calibrate(recipe, part)  # same command again: resumes
    sa, sb = load_file(str(full / "calibrated.safetensors")), load_file(str(part / "calibrated.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (tmp_path / ".part.partial").exists()


def test_resume_refuses_other_recipe(tmp_path):
    calibrate(tiny(method="brecq"), tmp_path / "x", max_blocks=1)
    with pytest.raises(ConfigError, match="different recipe"):
        calibrate(tiny(method="brecq", **{"calibration.seed": 1}), tmp_path / "x")


@pytest.mark.parametrize("overrides, match", [
    ({"calibration.method": "gptq"}, "calibration.method"),
    ({"quant.bits": "w3a8"}, "quant.bits"),
    ({"reconstruction.iters": 0}, "reconstruction.iters"),
    ({"calibration.steps": 0}, "calibration.steps"),
    ({"quant.weight_block_size": 96}, "block"),
])
def test_bad_recipe_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Recipe().with_overrides(overrides)


def test_block_size_not_dividing_input_dim(tmp_path):
    with pytest.raises(ConfigError, match="divis|divid"):
        calibrate(tiny(method="minmax", bits="w4a8", **{"quant.weight_block_size": 128}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_recipe_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[calibration]\nmethod = 'sa-ptq'\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_recipe(p)
    p.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(p)


def test_nan_in_calibration_data(tmp_path):
    model = tmp_path / "nan_model"
    shutil.copytree(DIGITS_UNET_DIR, model)
    w = load_file(str(model / "diffusion_pytorch_model.safetensors"))
    w["conv_out.bias"] = torch.full_like(w["conv_out.bias"], float("nan"))
    save_file(w, str(model / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SaqError, match="NaN|nan|non-finite"):
        calibrate(tiny(method="minmax", **{"model.spec": str(model)}), tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


@pytest.mark.slow
def test_tampered_artifact_refused(sa_ptq_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sa_ptq_artifact, bad)
    with open(bad / "calibrated.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ModelLoadError, match="does not match the hash"):
        load_artifact(bad)


def test_cli_bad_method_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--method", "gptq", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "gptq" in err and len(err.strip().splitlines()) == 1


def test_cli_minmax_w8a8(tmp_path, capsys):
    out = tmp_path / "mm"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--recipe", "calibration/digits_w8a8_minmax.toml", "--num-samples", "4",
              "--steps", "3", "-o", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["method"] == "minmax"


@pytest.mark.slow
def test_sample_from_artifact(sa_ptq_artifact, tmp_path, capsys):
    out = tmp_path / "q.png"
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--artifact", str(sa_ptq_artifact), "--sampler", "ddim", "--steps", "3", "-n", "4",
              "-o", str(out)])
    assert exc.value.code == 0
    info = json.loads(out.with_suffix(".json").read_text())["calibrated_artifact"]
    assert info["method"] == "sa-ptq" and len(info["state_sha256"]) == 64


def _fq(x, step, bits=8):
    """Oracle fake-quant, written out: symmetric, round half to even, clamp to the signed range."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / step), lo, hi) * step


def _attention_oracle(attn, h, steps):
    """The attention block's output recomputed by hand from its input ``h`` (B, C, H, W), with q, k,
    probs and v fake-quantized by the stored steps (``steps=None``: no attention quantization)."""
    fq = (lambda x, _: x) if steps is None else (lambda x, k: _fq(x, steps[k]))
    b, c, hh, ww = h.shape
    x = attn.group_norm(h.view(b, c, hh * ww)).transpose(1, 2)
    heads = attn.heads
    q, k, v = (lin(x).view(b, -1, heads, c // heads).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
    probs = (fq(q, "q") @ fq(k, "k").transpose(-1, -2) * (c // heads) ** -0.5).softmax(dim=-1)
    out = (fq(probs, "p") @ fq(v, "v")).transpose(1, 2).reshape(b, -1, c)
    out = attn.to_out[0](out).transpose(-1, -2).reshape(b, c, hh, ww)
    return (out + h) / attn.rescale_output_factor


@pytest.mark.slow  # two tiny calibrations: ~10 s on an idle 2-core machine
def test_attention_matmul_option_end_to_end(tmp_path):
    from saq_deploy.quant.attention import attention_quant_modules

    arts = {on: tmp_path / f"attn_{on}" for on in (True, False)}
    for on, out in arts.items():  # same data and seeds: only the attention option differs
        calibrate(tiny(method="minmax", **{"quant.attention_matmul": on}), out)
    states = {on: load_file(str(out / "calibrated.safetensors")) for on, out in arts.items()}
    quant_keys = {on: sorted(k for k in st if any(f".{n}_quant.act_step" in k for n in "qkvp"))
                  for on, st in states.items()}
    assert quant_keys[False] == [] and len(quant_keys[True]) >= 4
    assert all(states[True][k].numel() == 1 and states[True][k].item() > 0 for k in quant_keys[True])

    models = {on: load_artifact(out) for on, out in arts.items()}
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 50.0]), torch.tensor([3, 10])
    with torch.no_grad():
        eps = {on: m.eps_model()(x, t, y) for on, m in models.items()}
    assert (eps[True] - eps[False]).abs().max() > 1e-4

    # one quantized attention block against the hand-written oracle, on the input it really saw
    name, attn = next(iter(attention_quant_modules(models[True].loaded.unet).items()))
    assert attn.spatial_norm is None and attn.residual_connection and attn.norm_q is None
    seen = {}
    hook = attn.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], out=out))
    with torch.no_grad():
        models[True].eps_model()(x, t, y)
        hook.remove()
        steps = {n: states[True][f"{name}.{n}_quant.act_step"] for n in "qkvp"}
        want, fp = _attention_oracle(attn, seen["h"], steps), _attention_oracle(attn, seen["h"], None)
    torch.testing.assert_close(seen["out"], want, rtol=0, atol=1e-5)
    assert (seen["out"] - fp).abs().max() > 100 * 1e-5  # the oracle tells quantized from FP apart