"""Unconditional UNet2DModel (no class embedding, odd widths 24/48) through every stage: calibrate
with every method, export, lint, ONNX Runtime engine, parity gate, sample from model, artifact and
engine; a 4-channel latent-shaped UNet with and without a VAE.

Oracles: the per-channel weight codes and scales the artifact stores (independent of the export),
ONNX Runtime running the exported graph, the plain fake-quant model as the negative control of
the parity reference, and diffusers' own ``AutoencoderKL.decode`` for the VAE grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from tests.helpers import (
    LDM_SCHEDULE,
    save_pipeline_folder,
    tiny_unet_uncond,
    tiny_vae,
    train_briefly,
)

pytestmark = pytest.mark.slow
TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8,
        "qlora.epochs": 1, "qlora.mixstep": (2, 3), "qlora.batch_size": 2, "qlora.rank": 4}
METHODS = ("minmax", "percentile", "mse", "brecq", "sa-ptq", "sa-qlora", "qlora-mse")


def _cli(args: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0, args


def _recipe(model, method: str, bits: str = "w8a8", **extra) -> Recipe:
    return Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": method,
                                    "quant.bits": bits, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Briefly trained (random weights sample values in the hundreds: nothing to gate on)."""
    torch.set_num_threads(1)
    unet = train_briefly(tiny_unet_uncond(channels=3, widths=(24, 48)))
    return save_pipeline_folder(tmp_path_factory.mktemp("uncond") / "pipe", unet, scheduler_kwargs=LDM_SCHEDULE)


@pytest.fixture(scope="module")
def deployed(trained, tmp_path_factory):
    """minmax W8A8 on real trajectories -> export (both placements) -> ONNX Runtime engine."""
    from saq_deploy.backends import build_engine
    from saq_deploy.export.api import export_artifact

    art = tmp_path_factory.mktemp("dep") / "w8a8"
    calibrate(_recipe(trained, "minmax", **{"calibration.num_samples": 16, "calibration.steps": 10}), art)
    export_artifact(art)
    build_engine(art, "onnxruntime")
    return art


@pytest.mark.parametrize("method", METHODS)
def test_every_method_calibrates_an_unconditional_unet(trained, tmp_path, method):
    out = calibrate(_recipe(trained, method), tmp_path / method)
    q = load_artifact(out)
    assert q.manifest["method"] == method and q.loaded.kind == "uncond" and q.loaded.num_classes is None
    from saq_deploy.quant.fake_quant import quant_layers

    layers = quant_layers(q.loaded.unet)
    conv_in = layers["conv_in"]
    w, codes = conv_in.weight.detach(), conv_in.int_weight().detach().to(torch.float32)
    assert codes.abs().max() <= 128 and torch.equal(codes, codes.round())
    # the codes are the weights in units of the stored per-channel scale, rounded to nearest
    # (conv_in stays W8A8 round-to-nearest whatever the method)
    step = conv_in.weight_quant.scale.detach().reshape(-1, 1, 1, 1)
    assert float((w / step - codes).abs().max()) <= 0.5 + 1e-4
    m = q.manifest
    if method in ("brecq", "sa-ptq"):  # block reconstruction ran, block by block
        assert len(m["block_losses"]) >= 5 and all(np.isfinite(b["loss_after"]) for b in m["block_losses"])
    elif method in ("sa-qlora", "qlora-mse"):  # LoRA fine-tuning ran
        assert m.get("qlora") and not m["block_losses"]
    else:
        assert not m["block_losses"] and not m.get("qlora")
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([999.0, 600.0, 200.0, 5.0])
    with torch.no_grad():
        eq, ef = q.eps_model()(x, t, None), q.fp_unet(x, t).sample
    cos = torch.nn.functional.cosine_similarity(eq.flatten(), ef.flatten(), dim=0)
    assert 0.9 < float(cos) < 1.0  # quantized (not FP) and still the same model


def test_export_lint_engine_and_parity_gate(deployed):
    from saq_deploy.export.lint import lint_model

    for target in ("tensorrt", "onnxruntime-cpu"):
        issues = lint_model(deployed / "onnx" / target / "model.onnx", target=target)
        assert not [i for i in issues if i.severity == "error"], (target, issues)
    from saq_deploy.validate.run import validate_engine

    res = validate_engine(deployed, "onnxruntime", n=8, quality_n=0, log=lambda s: None)
    assert res["passed"], res["failures"]
    pl = res["placement"]
    assert pl["modelled_outputs"] >= 20 and pl["modelled_biases"] == pl["modelled_outputs"]
    assert json.loads((deployed / "engine" / "parity.json").read_text())["passed"]


def test_parity_reference_models_the_onnxruntime_placement(deployed):
    """Negative control: against the plain fake-quant model (no conv-output rounding, FP32 biases)
    the same engine is far off; against the reference it matches to rounding-flip level."""
    from saq_deploy.backends import load_engine
    from saq_deploy.export.feeds import record_calls
    from saq_deploy.validate.parity import snr_db
    from saq_deploy.validate.reference import placement_reference

    q, eng = load_artifact(deployed), load_engine(deployed / "engine")
    fq, en = q.eps_model(), eng.eps_model()
    calls = record_calls(fq, q.loaded, steps=10, n=4, seed=7)
    plain = [snr_db(fq(c.x, c.t, c.cond), en(c.x, c.t, c.cond)) for c in calls]
    with placement_reference(q, deployed, eng.manifest, log=lambda s: None):
        ref = [snr_db(fq(c.x, c.t, c.cond), en(c.x, c.t, c.cond)) for c in calls]
    assert np.median(ref) > 60 and min(ref) > 30, ref
    assert np.median(plain) < 45 and np.median(ref) > np.median(plain) + 15, (plain, ref)
    # the context restored the model: biases and outputs are the calibrated ones again
    after = fq(calls[0].x, calls[0].t, None)
    assert torch.equal(after, load_artifact(deployed).eps_model()(calls[0].x, calls[0].t, None))


def test_sample_from_model_artifact_and_engine(trained, deployed, tmp_path, capsys):
    runs = {"model": ["--model", str(trained)], "artifact": ["--artifact", str(deployed)],
            "engine": ["--engine", str(deployed / "engine")]}
    grids = {}
    for name, src in runs.items():
        out = tmp_path / f"{name}.png"
        _cli(["sample", *src, "-n", "4", "--steps", "5", "--sampler", "ddim", "-o", str(out)])
        line = capsys.readouterr().out
        assert "unconditional, no guidance" in line and "cfg" not in line, line
        m = json.loads(out.with_suffix(".json").read_text())
        assert m["ran"]["guidance_scale"] is None and m["grid_note"] is None
        img = Image.open(out)
        assert img.mode == "RGB"
        grids[name] = np.asarray(img, dtype=np.float64)
    assert not np.array_equal(grids["model"], grids["artifact"])  # the quantized model ran
    assert np.abs(grids["artifact"] - grids["engine"]).mean() < 2.0  # engine ~ fake-quant (uint8 levels)


def test_latent_unet_without_vae_writes_per_channel_grid(tmp_path, capsys):
    root = save_pipeline_folder(tmp_path / "latent", tiny_unet_uncond(channels=4, widths=(24, 48)))
    out = tmp_path / "l.png"
    _cli(["sample", "--model", str(root), "-n", "2", "--steps", "2", "-o", str(out)])
    printed = capsys.readouterr().out
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["decoded_by_vae"] is None and "per-channel" in m["grid_note"]
    assert f"note: {m['grid_note']}" in printed
    assert Image.open(out).mode == "L"  # never RGBA


def test_latent_unet_with_vae_decodes_like_diffusers(tmp_path, capsys):
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.models.loading import load_model
    from saq_deploy.utils.images import make_grid

    vae = tiny_vae(latent_channels=4, scaling_factor=0.5)
    root = save_pipeline_folder(tmp_path / "ldm", tiny_unet_uncond(channels=4, widths=(24, 48)), vae=vae)
    loaded = load_model(root)
    assert loaded.vae is not None and loaded.image_shape == (3, 16, 16)
    settings = SampleSettings(sampler="ddim", steps=2, n=2, seed=3)
    latents, _ = generate(loaded.eps_model(), loaded.schedule(), loaded.sample_shape, settings)
    with torch.no_grad():  # the oracle: diffusers' own decode of latents / scaling_factor
        want = vae.decode(latents / 0.5).sample
    got = loaded.decode(latents)
    assert got.shape == (2, 3, 16, 16) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, vae.decode(latents).sample, atol=1e-3)  # the scaling factor matters
    out = tmp_path / "v.png"
    _cli(["sample", "--model", str(root), "-n", "2", "--steps", "2", "--sampler", "ddim", "--seed", "3",
          "-o", str(out)])
    assert "decoded by the VAE" in capsys.readouterr().out
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["decoded_by_vae"].endswith("vae") and m["grid_note"] is None
    img = np.asarray(Image.open(out))
    assert img.shape[-1] == 3 and np.array_equal(img, make_grid(want))


def test_latent_unet_with_vae_calibrates_and_samples_from_artifact(tmp_path, capsys):
    root = save_pipeline_folder(tmp_path / "ldm", tiny_unet_uncond(channels=4, widths=(24, 48)),
                                vae=tiny_vae(), scheduler_kwargs=LDM_SCHEDULE)
    from saq_deploy.backends import build_engine

    art = calibrate(_recipe(root, "minmax"), tmp_path / "art")
    build_engine(art, "onnxruntime")  # exports the ONNX Runtime placement first
    grids = {}
    for name, src in (("artifact", ["--artifact", str(art)]), ("engine", ["--engine", str(art / "engine")])):
        out = tmp_path / f"{name}.png"
        _cli(["sample", *src, "-n", "2", "--steps", "2", "-o", str(out)])
        assert "decoded by the VAE" in capsys.readouterr().out
        assert Image.open(out).mode == "RGB"  # the engine found the VAE in the pipeline it came from
        grids[name] = np.asarray(Image.open(out), dtype=np.float64)
    assert np.abs(grids["artifact"] - grids["engine"]).mean() < 3.0


def test_vae_of_another_pipeline_is_refused_in_one_line_before_sampling(tmp_path, capsys):
    root = save_pipeline_folder(tmp_path / "bad", tiny_unet_uncond(channels=4, widths=(24, 48)),
                                vae=tiny_vae(latent_channels=3))
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(root), "-n", "2", "--steps", "2", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "does not belong to this unet/" in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()
