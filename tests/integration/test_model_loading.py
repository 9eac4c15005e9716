"""Local diffusers folders load and sample through the CLI; broken ones fail clearly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.models.loading import load_model
from tests.helpers import save_pipeline_folder, save_unet_folder, tiny_unet2d, tiny_unet_cond


def test_builtin_loads():
    m = load_model("builtin:digits")
    assert m.kind == "class" and m.num_classes == 10 and m.null_label == 10
    assert m.sample_shape == (1, 16, 16)
    eps = m.eps_model()(torch.randn(2, 1, 16, 16), torch.tensor([999.0, 10.5]), torch.tensor([1, 10]))
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()


def test_local_unet_folder_matches_in_memory(tmp_path):
    unet = tiny_unet2d().eval()
    folder = save_unet_folder(tmp_path / "unet", unet, meta={"num_classes": 10, "null_label": 10})
    m = load_model(str(folder))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 500.0, 900.0]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        ref = unet(x, t, class_labels=y).sample
    torch.testing.assert_close(m.eps_model()(x, t, y), ref, rtol=0, atol=0)


def test_pipeline_folder_and_cli(tmp_path, capsys):
    root = save_pipeline_folder(tmp_path / "pipe", tiny_unet2d(num_class_embeds=None))
    m = load_model(str(root))
    assert m.kind == "uncond" and m.num_classes is None
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(root), "--steps", "2", "-n", "2", "--cfg", "1", "-o", str(out)])
    assert exc.value.code == 0 and out.exists()


def test_class_model_without_null_label_refuses_cfg(tmp_path):
    from saq_deploy.generate import SampleSettings, generate

    m = load_model(str(save_unet_folder(tmp_path / "u", tiny_unet2d())))
    with pytest.raises(ConfigError, match="unconditional input"):
        generate(m.eps_model(), m.schedule(), m.sample_shape, SampleSettings(n=2, steps=1, cfg=1.5),
                 num_classes=m.num_classes, null_label=m.null_label)


def test_missing_scheduler_config(tmp_path):
    folder = save_unet_folder(tmp_path / "u", tiny_unet2d(), scheduler=False)
    with pytest.raises(ModelLoadError, match="scheduler_config.json"):
        load_model(str(folder))


def test_cross_attention_unet_with_cond_file(tmp_path, capsys):
    folder = save_unet_folder(tmp_path / "u", tiny_unet_cond())
    cond = tmp_path / "emb.safetensors"
    save_file({"cond": torch.randn(1, 5, 12), "uncond": torch.zeros(1, 5, 12)}, str(cond))
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(folder), "--steps", "2", "-n", "2", "--cfg", "2",
              "--cond-file", str(cond), "-o", str(out)])
    assert exc.value.code == 0 and out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(folder), "--steps", "2", "-n", "2", "-o", str(tmp_path / "h.png")])
    assert exc.value.code == 1 and "--cond-file" in capsys.readouterr().err


def test_pipeline_folder_without_model_index(tmp_path, capsys):
    """unet/ + scheduler/ saved part by part (no model_index.json) is a pipeline folder too (issue 12);
    a vae/ there decodes the latents, so a broken one is refused in one line, not skipped."""
    unet = tiny_unet2d(num_class_embeds=None).eval()
    root = save_pipeline_folder(tmp_path / "pipe", unet)
    (root / "model_index.json").unlink()
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"vae/config.json' is not a readable JSON config"):
        load_model(str(root))
    (root / "vae" / "config.json").unlink()
    (root / "vae").rmdir()
    m = load_model(str(root))
    assert m.vae is None
    assert m.unet_dir == root / "unet" and m.kind == "uncond"
    assert m.scheduler_config["num_train_timesteps"] == 1000
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 800.0])
    with torch.no_grad():
        torch.testing.assert_close(m.eps_model()(x, t), unet(x, t).sample, rtol=0, atol=0)
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(root), "--steps", "2", "-n", "2", "--cfg", "1", "-o", str(out)])
    assert exc.value.code == 0 and out.exists()


def test_folder_with_neither_config_nor_unet(tmp_path):
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json, unet/config.json or model_index.json"):
        load_model(str(tmp_path))
