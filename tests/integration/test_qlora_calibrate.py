"""`calibrate` with sa-qlora / qlora-mse on a tiny UNet folder: artifact, exact reload, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import saq_deploy.calibrate.artifact as artifact_mod
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.quant import quant_layers
from tests.helpers import save_unet_folder, tiny_unet2d

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "qlora.epochs": 2, "qlora.mixstep": (2, 3),
        "qlora.batch_size": 2, "qlora.rank": 4, "quant.weight_block_size": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_unet_folder(tmp_path_factory.mktemp("m") / "tiny", tiny_unet2d(),
                            meta={"num_classes": 10, "null_label": 10})


def tiny(model_dir, method="sa-qlora", bits="w4a8", **extra) -> Recipe:
    return Recipe().with_overrides({**TINY, "model.spec": str(model_dir), "calibration.method": method,
                                    "quant.bits": bits, **extra})


def _inputs():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), \
        torch.tensor([990.0, 400.0, 7.5]), torch.tensor([1, 4, 10])


def test_artifact_reproduces_trained_model(model_dir, tmp_path, monkeypatch):
    captured = {}
    real_save = artifact_mod.save_artifact

    def spy(out_dir, *, unet, **kw):
        x, t, y = _inputs()
        captured["eps"] = artifact_mod.FakeQuantEpsModel(unet, 1)(x, t, y)
        captured["weights"] = {n: layer.weight.detach().clone() for n, layer in quant_layers(unet).items()}
        return real_save(out_dir, unet=unet, **kw)

    monkeypatch.setattr(artifact_mod, "save_artifact", spy)
    out = tmp_path / "a"
    calibrate(tiny(model_dir), out)
    m = json.loads((out / "manifest.json").read_text())
    q = m["qlora"]
    assert m["method"] == "sa-qlora" and q["teacher"] == "dpm-solver-2" and q["target"] == "fp_intermediate"
    assert q["rank"] == 4 and q["epochs"] == 2 and q["optimizer_steps"] == 10 and len(q["loss_history"]) == 2
    assert q["finetune_s"] > 0 and q["lora_layers"] > 0 and "deployment_note" in m
    state = load_file(str(out / "calibrated.safetensors"))
    merged = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_fp")}
    assert len(merged) == q["lora_layers"] and not any(n.startswith(("conv_in", "conv_out", "time_")) for n in merged)
    loaded = load_artifact(out)
    x, t, y = _inputs()
    assert torch.equal(loaded.eps_model()(x, t, y), captured["eps"])
    layers = quant_layers(loaded.loaded.unet)
    for name, w in captured["weights"].items():
        assert torch.equal(layers[name].weight, w), name  # the merged FP weight, not the source's
    fp = dict(loaded.fp_unet.named_parameters())
    assert any(not torch.equal(fp[f"{n}.weight"], captured["weights"][n]) for n in merged)


def test_resume_after_interruption_matches_uninterrupted(model_dir, tmp_path):
    recipe = tiny(model_dir, method="qlora-mse", **{"qlora.cos_weight": 0.0})
    full = tmp_path / "full"
    calibrate(recipe, full)
    part = tmp_path / "part"
    assert calibrate(recipe, part, max_epochs=1) == tmp_path / ".part.partial"  # "killed" after epoch 1
    info = json.loads((tmp_path / ".part.partial" / "ckpt.json").read_text())
    assert not part.exists() and info["epochs_done"] == 1 and len(info["history"]) == 1
    calibrate(recipe, part)  # the same command again: continues at epoch 2
    sa, sb = load_file(str(full / "calibrated.safetensors")), load_file(str(part / "calibrated.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ha = json.loads((full / "manifest.json").read_text())["qlora"]["loss_history"]
    hb = json.loads((part / "manifest.json").read_text())["qlora"]["loss_history"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]
    assert json.loads((full / "manifest.json").read_text())["qlora"]["teacher"] == "ddim"
    assert not (tmp_path / ".part.partial").exists()


def test_cli_sa_qlora_w4a4(model_dir, tmp_path, capsys):
    out, recipe = tmp_path / "cli", tmp_path / "r.toml"
    recipe.write_text("[quant]\nweight_block_size = 0\n[qlora]\nmixstep = [2, 3]\nbatch_size = 2\n")
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--recipe", str(recipe), "--method", "sa-qlora", "--bits", "w4a4", "--model", str(model_dir),
              "--epochs", "1", "--rank", "2", "--num-samples", "4", "--steps", "2", "-o", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["bits"] == "w4a4" and m["qlora"]["rank"] == 2 and m["qlora"]["epochs"] == 1
    assert "ONNX Runtime only" in m["deployment_note"] and "TensorRT" in m["deployment_note"]


def test_keep_8bit_layers_keep_their_ptq_quantizers(model_dir, tmp_path):
    """conv_in / conv_out / time MLP: no LoRA and no trained steps (a shrunk conv_in step clips x_T)."""
    calibrate(tiny(model_dir, **{"qlora.lr_act": 0.05, "qlora.lr_scale": 0.05}), tmp_path / "q")
    calibrate(tiny(model_dir, method="minmax"), tmp_path / "m")  # same data, same 8-bit observers
    q, m = (load_file(str(tmp_path / n / "calibrated.safetensors")) for n in ("q", "m"))
    for layer in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        for key in ("act_step", "weight_scale", "weight_int"):
            assert torch.equal(q[f"{layer}.{key}"], m[f"{layer}.{key}"]), f"{layer}.{key}"
    trained = [k for k in q if k.endswith(".act_step") and not torch.equal(q[k], m[k])]
    assert trained  # the 4-bit layers' steps did move
