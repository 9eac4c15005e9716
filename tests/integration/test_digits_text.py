"""`builtin:digits-text`, the trained text-to-image reference pipeline, through every stage: it loads
through the same code path as any SD-1.x pipeline folder, follows its prompts, calibrates from
prompts through its own text encoder, exports, builds an ONNX Runtime engine that passes the parity
gate on prompted CFG trajectories, samples with `--prompt` from model, artifact and engine, and the
engine runs as a drop-in `unet` of a diffusers StableDiffusionPipeline assembled from the folder.

Oracles: the digit classifier and the pixel ink rule that labelled the training data (prompt and
attribute accuracy), transformers' CLIP called directly (`--prompt` == `--cond-file` with those
embeddings), the fake-quant UNet stepping in the same diffusers pipeline (the engine)."""

from __future__ import annotations

import json

import pytest
import torch

from saq_deploy.cli.app import main
from saq_deploy.reference import DIGITS_TEXT_DIR
from tests.helpers import encode_text

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
PROMPTS = ["a bold seven", "thin 3", "a thin two"]


def _cli(args: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0, args


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_builtin_loads_through_the_pipeline_folder_path():
    from saq_deploy.models.loading import load_model

    a, b = load_model("builtin:digits-text"), load_model(str(DIGITS_TEXT_DIR))
    assert a.kind == b.kind == "text" and a.source_hash == b.source_hash
    assert a.unet.config.cross_attention_dim == 64 and a.unet_dir == DIGITS_TEXT_DIR / "unet"
    kinds = {type(m).__name__ for m in a.unet.modules()}
    assert {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn", "BasicTransformerBlock"} <= kinds


def test_fp_model_follows_its_prompts():
    """n = 200 balanced prompts, DDIM-20, CFG 1.5: the digit named is drawn, and the stroke weight
    named is the one the image has (chance: 10 % and 50 %)."""
    from saq_deploy.api import evaluate_model
    from saq_deploy.generate import SampleSettings

    torch.set_num_threads(1)
    res = evaluate_model("builtin:digits-text", SampleSettings(sampler="ddim", steps=20, cfg=1.5, n=200,
                                                              batch_size=100))
    m = res["metrics"]
    assert m["prompt_accuracy"] >= 0.9, m
    assert m["attribute_accuracy"] >= 0.7, m
    assert m["digit_fid"] < 30, m
    assert res["prompts"][0] == "a thin zero" and len(res["prompts"]) == 20


def test_sample_prompt_equals_cond_file_with_the_encoders_own_embeddings(tmp_path, capsys):
    from safetensors.torch import save_file

    states = encode_text(DIGITS_TEXT_DIR, [*PROMPTS, "blurry"])
    n = 6
    save_file({"cond": states[torch.arange(n) % 3].contiguous(), "uncond": states[3:].contiguous()},
              str(tmp_path / "emb.safetensors"))
    common = ["sample", "--model", "builtin:digits-text", "-n", str(n), "--steps", "4", "--sampler", "ddim"]
    _cli([*common, *[a for p in PROMPTS for a in ("--prompt", p)], "--negative-prompt", "blurry",
          "-o", str(tmp_path / "p.png")])
    _cli([*common, "--cond-file", str(tmp_path / "emb.safetensors"), "-o", str(tmp_path / "c.png")])
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    m = json.loads((tmp_path / "p.json").read_text())
    assert m["prompts"] == PROMPTS and m["negative_prompt"] == "blurry" and m["conditioning"] == "prompts"
    pf = tmp_path / "prompts.txt"
    pf.write_text("a bold seven\n\nthin 3\n")
    _cli([*common, "--prompts-file", str(pf), "-o", str(tmp_path / "f.png")])
    assert json.loads((tmp_path / "f.json").read_text())["prompts"] == ["a bold seven", "thin 3"]
    _cli([*common, "-o", str(tmp_path / "d.png")])  # no prompt: the pipeline's default prompts
    assert json.loads((tmp_path / "d.json").read_text())["conditioning"] == "default-prompts"


def test_prompt_mistakes_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "g.png")
    base = ["sample", "-n", "2", "--steps", "2", "-o", out]
    assert "this model is class-conditional: use --label" in _fails([*base, "--prompt", "seven"], capsys)
    emb = tmp_path / "e.safetensors"
    from safetensors.torch import save_file

    save_file({"cond": torch.zeros(1, 16, 64)}, str(emb))
    err = _fails([*base, "--model", "builtin:digits-text", "--prompt", "a", "--cond-file", str(emb)], capsys)
    assert "not both" in err
    err = _fails([*base, "--model", "builtin:digits-text", "--label", "3"], capsys)
    assert "takes --prompt" in err
    err = _fails([*base, "--model", "builtin:digits-text", "--prompts-file", str(tmp_path / "none.txt")], capsys)
    assert "does not exist" in err
    assert not list(tmp_path.glob("g.*"))


@pytest.fixture(scope="module")
def engine_artifact(tmp_path_factory):
    """minmax W8A8 calibrated from prompts through the pipeline's text encoder, CFG 1.5 -> ORT engine."""
    from saq_deploy.backends import build_engine
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.export.api import export_artifact

    torch.set_num_threads(1)
    art = tmp_path_factory.mktemp("dt") / "w8a8"
    recipe = Recipe().with_overrides({
        "model.spec": "builtin:digits-text", "calibration.method": "minmax", "calibration.num_samples": 16,
        "calibration.steps": 10, "calibration.cfg": 1.5, "prompts.prompts": PROMPTS})
    calibrate(recipe, art)
    export_artifact(art, ("onnxruntime-cpu", "tensorrt"))
    build_engine(art, "onnxruntime")
    return art


def _grid_tiles(png, scale: int = 4, pad: int = 2, size: int = 16) -> torch.Tensor:
    """The samples back from a grid PNG (utils.images.make_grid's layout), in [-1, 1]."""
    import numpy as np
    from PIL import Image

    grid = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    step = size * scale + pad
    tiles = [grid[pad + r * step: pad + r * step + size * scale: scale, pad + c * step: pad + c * step + size * scale: scale]
             for r in range((grid.shape[0] - pad) // step) for c in range((grid.shape[1] - pad) // step)]
    tiles = [t for t in tiles if t.min() < 255]  # a grid's unused cells are left white
    return torch.from_numpy(np.stack(tiles))[:, None] / 127.5 - 1


def test_the_tensorrt_onnx_of_a_text_unet_passes_the_lint(engine_artifact):
    _cli(["lint", str(engine_artifact / "onnx" / "tensorrt" / "model.onnx"), "--target", "tensorrt"])


def test_engine_draws_sevens_for_a_bold_seven(engine_artifact, tmp_path):
    """The done-when line of the text path: `sample --engine ... --prompt "a bold seven"` draws
    sevens (the digit classifier reads the PNG the CLI wrote; blank tiles would read as anything)."""
    from saq_deploy.eval.features import DigitFeatures

    out = tmp_path / "sevens.png"
    _cli(["sample", "--engine", str(engine_artifact / "engine"), "--prompt", "a bold seven", "-n", "8",
          "--steps", "10", "--cfg", "1.5", "--seed", "0", "-o", str(out)])
    tiles = _grid_tiles(out)
    assert len(tiles) == 8 and float(tiles.std()) > 0.3
    pred = DigitFeatures().probs(tiles).argmax(1)
    assert int((torch.as_tensor(pred) == 7).sum()) >= 7, pred


def test_engine_passes_the_parity_gate_and_samples_with_prompts(engine_artifact, tmp_path):
    from saq_deploy.validate.run import validate_engine

    res = validate_engine(engine_artifact, "onnxruntime", n=4, quality_n=0, log=lambda s: None)
    assert res["passed"], (res["failures"], res["metrics"])
    _cli(["sample", "--engine", str(engine_artifact / "engine"), "--prompt", "a bold seven", "-n", "2",
          "--steps", "4", "-o", str(tmp_path / "e.png")])
    _cli(["sample", "--artifact", str(engine_artifact), "-n", "3", "--steps", "4", "-o", str(tmp_path / "a.png")])
    assert json.loads((tmp_path / "a.json").read_text())["conditioning"] == "artifact"


def test_engine_is_a_drop_in_unet_of_a_diffusers_pipeline(engine_artifact):
    """StableDiffusionPipeline from the folder, stepping with its own (DDIM) scheduler and text
    encoder; its unet replaced by the engine, then by the fake-quant UNet it came from."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from saq_deploy.backends import load_engine
    from saq_deploy.backends.diffusers_unet import EngineUNet
    from saq_deploy.calibrate.artifact import load_artifact

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_TEXT_DIR, local_files_only=True, vae=None,
                                                   safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = 16 * pipe.vae_scale_factor  # no VAE: the pipeline's latents are the 16x16 images

    def run(unet):
        pipe.unet = unet
        return pipe(PROMPTS, height=size, width=size, num_inference_steps=10, guidance_scale=1.5,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    engine_out = run(EngineUNet(load_engine(engine_artifact / "engine")))
    q = load_artifact(engine_artifact)
    fq_out = run(q.loaded.unet)
    fp_out = run(q.fp_unet)
    assert engine_out.shape == (3, 1, 16, 16)
    err, spread = (engine_out - fq_out).pow(2).mean(), (fp_out - fq_out).pow(2).mean()
    psnr = 10 * torch.log10(4 / err)
    assert psnr > 30, (float(psnr), float(err), float(spread))
    assert not torch.allclose(engine_out[0], engine_out[1], atol=0.1)  # different prompts, different digits
