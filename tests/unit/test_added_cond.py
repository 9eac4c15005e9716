"""SDXL added conditioning packed behind the text states (models.eps_model.AddedCond)."""

from __future__ import annotations

import torch

from saq_deploy.models.eps_model import AddedCond, text_kwargs


def test_layout_from_an_sdxl_config_and_plain_configs():
    sdxl = {"addition_embed_type": "text_time", "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816}  # SDXL base's config.json values
    a = AddedCond.of(sdxl)
    assert (a.text_embeds, a.width, a.rows) == (1280, 2048, 1)
    assert AddedCond.of({**sdxl, "cross_attention_dim": [2048, 2048]}) == a
    assert AddedCond.of({"cross_attention_dim": 768}) is None  # SD-1.5
    assert AddedCond.of({**sdxl, "addition_embed_type": "text"}) is None


def test_pack_unpack_round_trip_over_several_rows():
    a = AddedCond(text_embeds=20, width=8)  # 20 + 6 values -> 4 rows of 8, 6 of them padding
    states, te, ti = torch.randn(3, 5, 8), torch.randn(3, 20), torch.rand(3, 6) * 1024
    packed = a.pack(states, te, ti)
    assert packed.shape == (3, 5 + 4, 8) and a.rows == 4
    assert torch.count_nonzero(packed[:, -1, 2:]) == 0  # the padding
    kw = text_kwargs(packed, a)
    assert torch.equal(kw["encoder_hidden_states"], states)
    assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], te)
    assert torch.equal(kw["added_cond_kwargs"]["time_ids"], ti)
    # row selection (a prompt table indexed by cond) and batch concatenation (CFG) keep each row's tail
    sel = text_kwargs(torch.cat([packed[2:], packed[:1]]), a)["added_cond_kwargs"]
    assert torch.equal(sel["text_embeds"], torch.cat([te[2:], te[:1]]))
    assert text_kwargs(states, None) == {"encoder_hidden_states": states}
