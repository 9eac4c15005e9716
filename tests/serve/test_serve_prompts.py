"""``prompt`` / ``negative_prompt`` requests on a cross-attention model, and VAE decode of served samples.

A tiny random text pipeline (unet/, scheduler/, tokenizer/, text_encoder/, optionally vae/) is
built here. Oracle for prompts: the pipeline's TextEncoder run directly, its states sent as an
``embedding`` request with the same seed, must give byte-identical images. Oracle for the VAE: the
image size the VAE's 2x upsampling gives, and the VAE's own decode of the undecoded samples.
"""

from __future__ import annotations

import base64
import io
import sys

import pytest
import torch
from PIL import Image

from tests.serve.conftest import client_for, make_served

PROMPT = "a bold seven"


def _text_pipeline(root, *, text: bool = True, vae: bool = False):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    if text:
        from transformers import CLIPTextConfig, CLIPTextModel

        from saq_deploy.reference.text_data import write_tokenizer

        tok = write_tokenizer(root / "tokenizer")
        CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(root / "text_encoder")
    if vae:
        from tests.helpers import tiny_vae

        tiny_vae(latent_channels=1).save_pretrained(root / "vae", safe_serialization=True)
    return root


def _served(root):
    from saq_deploy.models.loading import load_model
    from saq_deploy.serve.model import from_loaded

    loaded = load_model(root)
    return from_loaded(loaded, loaded.eps_model(), artifact_manifest={"calibrated_for": {
        "samplers": ["ddim"], "steps": 2}})


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    return _text_pipeline(tmp_path_factory.mktemp("textpipe"))


@pytest.fixture(scope="module")
def encoder_loads(pipe):
    """The served model, loaded once for the module, and how many times its TextEncoder was built."""
    from saq_deploy.models import text_encoder as te

    count = {"n": 0}
    real_init = te.TextEncoder.__init__

    def counting(self, root):
        count["n"] += 1
        real_init(self, root)

    te.TextEncoder.__init__ = counting
    try:
        served = _served(pipe)
    finally:
        te.TextEncoder.__init__ = real_init
    return served, count


def _gen(c, **body):
    r = c.post("/v1/generate", json={"steps": 2, "seed": 7, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_matches_the_encoders_embedding_and_loads_it_once(pipe, encoder_loads):
    from saq_deploy.models.text_encoder import TextEncoder

    served, loads = encoder_loads
    direct = TextEncoder(pipe)
    emb, neg = direct([PROMPT])[0], direct([""])[0]
    assert emb.shape == (16, 32)
    with client_for(served) as c:
        info = c.get("/v1/model").json()
        assert info["prompts"]["accepted"] is True and info["prompts"]["max_tokens"] == 16
        by_text = [_gen(c, prompt=PROMPT, cfg=2.0) for _ in range(2)]  # twice: the second from the cache
        by_emb = _gen(c, embedding=emb.tolist(), negative_embedding=neg.tolist(), cfg=2.0)
        assert by_text[0]["images"] == by_text[1]["images"] == by_emb["images"]
        assert by_text[0]["warnings"] == []
        # the default negative prompt is "" (as diffusers): a different one changes the images
        other_neg = _gen(c, prompt=PROMPT, negative_prompt="a thin two", cfg=2.0)
        assert other_neg["images"] != by_emb["images"]
        by_neg_emb = _gen(c, embedding=emb.tolist(), negative_embedding=direct(["a thin two"])[0].tolist(), cfg=2.0)
        assert other_neg["images"] == by_neg_emb["images"]
        # cfg=1: only the prompt matters, and a negative prompt is reported as unused
        plain = _gen(c, prompt=PROMPT, cfg=1.0, negative_prompt="x")
        assert plain["images"] == _gen(c, embedding=emb.tolist(), cfg=1.0)["images"]
        assert any("unused at cfg=1" in w for w in plain["warnings"])
        other = _gen(c, prompt="a thin two", cfg=2.0)
        assert other["images"] != by_emb["images"]
    assert loads["n"] == 1  # at start-up, never per request


def test_long_prompt_is_truncated_with_a_warning(encoder_loads):
    served, _ = encoder_loads
    long = " ".join(["seven"] * 40)
    cut = " ".join(["seven"] * 14)  # 16 tokens: start, 14 words, end
    with client_for(served) as c:
        r = c.post("/v1/generate", json={"steps": 2, "seed": 1, "prompt": long, "cfg": 1.0})
        assert r.status_code == 200, r.text
        warnings = r.json()["warnings"]
        assert any("'prompt' is" in w and "maximum 16" in w and "truncated" in w for w in warnings), warnings
        assert r.headers["X-SAQ-Warning"].isascii() and "\n" not in r.headers["X-SAQ-Warning"]
        same = c.post("/v1/generate", json={"steps": 2, "seed": 1, "prompt": cut, "cfg": 1.0}).json()
        assert same["images"] == r.json()["images"] and same["warnings"] == []


def test_bad_prompt_requests_get_one_clear_line(encoder_loads):
    served, _ = encoder_loads
    emb = [[0.0] * 32] * 16
    cases = [
        ({"prompt": PROMPT, "embedding": emb}, "not both"),
        ({"prompt": PROMPT, "negative_embedding": emb}, "not both"),
        ({"negative_prompt": "x", "embedding": emb}, "not both"),
        ({"negative_prompt": "x"}, "'negative_prompt' needs 'prompt'"),
        ({"prompt": 7}, "prompt: Input should be a valid string"),
        ({"prompt": ["a", "b"]}, "prompt: Input should be a valid string"),
        ({"negative_prompt": None, "prompt": None}, "send 'prompt' (text) or 'embedding'"),
        ({"prompt": "x" * 5000}, "prompt: String should have at most 4096 characters"),
    ]
    with client_for(served) as c:
        for body, fragment in cases:
            r = c.post("/v1/generate", json={"steps": 2, **body})
            assert r.status_code == 422 and fragment in r.json()["error"], (body, r.text)
            assert "\n" not in r.json()["error"]


def test_prompt_on_class_and_unconditional_models_is_refused():
    for kind, fragment in [("class", "class-conditional: send 'label', not a prompt"),
                           ("uncond", "unconditional: 'prompt' does not apply")]:
        served, _ = make_served(kind)
        with client_for(served) as c:
            assert c.get("/v1/model").json()["prompts"] is None
            r = c.post("/v1/generate", json={"prompt": PROMPT, "steps": 2})
            assert r.status_code == 422 and fragment in r.json()["error"], r.text


def test_folder_without_text_encoder_takes_only_embeddings(tmp_path):
    served = _served(_text_pipeline(tmp_path / "p", text=False))
    with client_for(served) as c:
        info = c.get("/v1/model").json()["prompts"]
        assert info["accepted"] is False and "no tokenizer/ and text_encoder/" in info["reason"]
        assert str(tmp_path) not in info["reason"]  # /v1/model names no server paths
        r = c.post("/v1/generate", json={"prompt": PROMPT, "steps": 2})
        err = r.json()["error"]
        assert r.status_code == 422 and "does not take prompts" in err and "only 'embedding'" in err, r.text
        r = c.post("/v1/generate", json={"steps": 2})
        assert r.status_code == 422 and "send 'embedding'" in r.json()["error"] and "'prompt'" not in r.json()["error"]
        _gen(c, embedding=[[0.0] * 32] * 16, cfg=1.0)


def test_missing_transformers_is_said_and_embeddings_still_work(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    served = _served(pipe)
    with client_for(served) as c:
        assert c.get("/v1/model").json()["prompts"]["accepted"] is False
        r = c.post("/v1/generate", json={"prompt": PROMPT, "steps": 2})
        assert r.status_code == 422 and "lacks the 'transformers' package" in r.json()["error"], r.text
        _gen(c, embedding=[[0.0] * 32] * 16, cfg=1.0)


def test_vae_pipeline_serves_decoded_images(tmp_path):

    root = _text_pipeline(tmp_path / "p", vae=True)
    served = _served(root)
    with client_for(served) as c:
        model = c.get("/v1/model").json()["model"]
        assert model["decoded_by_vae"] is True and model["image_shape"] == [3, 16, 16]
        body = _gen(c, prompt=PROMPT, cfg=1.0)
    img = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert (body["width"], body["height"], body["mode"]) == (16, 16, "RGB") and img.size == (16, 16)


def test_served_image_is_the_vaes_decode_of_the_unclamped_sample(tmp_path):
    from saq_deploy.serve.handling import encode_pngs

    served = _served(_text_pipeline(tmp_path / "p", vae=True))
    seen, decode = [], served.decode

    def recording(latents):
        seen.append(latents.clone())
        return decode(latents)

    served.decode = recording
    with client_for(served) as c:
        body = _gen(c, prompt=PROMPT, cfg=1.0)
    (latents,) = seen
    assert latents.shape == (1, 1, 8, 8)
    vae = decode.__self__.vae  # oracle: diffusers' AutoencoderKL.decode called directly
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor).sample
    assert base64.b64encode(encode_pngs(direct.clamp(-1, 1))[0][0]).decode() == body["images"][0]


def test_warning_header_is_ascii_on_one_line():
    from saq_deploy.serve.app import _header_text

    out = _header_text("truncated to 'ünï\r\nx'")
    assert out.isascii() and "\r" not in out and "\n" not in out and "\\xfc" in out


def test_prompts_through_an_onnxruntime_engine(pipe, tmp_path):
    """Calibrated from an embeddings file of the pipeline's own encoder, built for ONNX Runtime:
    the engine finds the text encoder through its manifest's source model spec."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    from saq_deploy.backends import build_engine
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.models.text_encoder import TextEncoder
    from saq_deploy.serve.model import load_served
    from tests.serve.conftest import TINY_CAL, write_fixture_gate

    enc = TextEncoder(pipe)
    table = enc([PROMPT, "a thin two", ""])
    save_file({"cond": table[:2].contiguous(), "uncond": table[2:].contiguous()}, str(tmp_path / "emb.safetensors"))
    art = calibrate(Recipe().with_overrides({**TINY_CAL, "model.spec": str(pipe),
                                             "prompts.embeddings_file": str(tmp_path / "emb.safetensors")}),
                    tmp_path / "art")
    build_engine(art, "onnxruntime")
    write_fixture_gate(art / "engine")
    served = load_served(art, "onnxruntime", threads=1)
    assert served.prompts.accepted, served.prompts.reason
    with client_for(served) as c:
        assert c.get("/v1/model").json()["prompts"]["accepted"] is True
        by_text = _gen(c, prompt=PROMPT, cfg=2.0)
        by_emb = _gen(c, embedding=table[0].tolist(), negative_embedding=table[2].tolist(), cfg=2.0)
        assert by_text["images"] == by_emb["images"]
        assert _gen(c, prompt="a thin two", cfg=2.0)["images"] != by_text["images"]
