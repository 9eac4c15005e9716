"""Weight files must match the UNet config key for key (issue 15 item 1): diffusers would otherwise
fill missing layers with random values (and drop unknown weights) with only a log warning, and
``sample`` would write an image of noise and exit 0. Pickle-based .bin weights are vetted with
``weights_only`` before diffusers sees them."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from saq_deploy.cli.app import main
from saq_deploy.errors import ModelLoadError
from saq_deploy.models.loading import load_model
from saq_deploy.reference import DIGITS_UNET_DIR
from tests.helpers import save_unet_folder, tiny_unet2d, tiny_unet_cond

WEIGHTS = "diffusion_pytorch_model.safetensors"


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def edited_reference(tmp_path, drop=(), add=None):
    """A copy of the committed reference UNet folder with keys removed from / added to its weights."""
    folder = tmp_path / "digits-copy"
    shutil.copytree(DIGITS_UNET_DIR, folder)
    sd = load_file(str(folder / WEIGHTS))
    for k in drop:
        del sd[k]
    sd.update(add or {})
    save_file(sd, str(folder / WEIGHTS))
    return folder


def assert_refused_without_output(folder, tmp_path, capsys, fragments, extra=()):
    out = tmp_path / "out" / "g.png"
    rc, err = run_cli(["sample", "--model", str(folder), "-n", "2", "--steps", "1", *extra, "-o", str(out)],
                      capsys)
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weight file "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_missing_keys_in_the_reference_weights_are_refused(tmp_path, capsys):
    folder = edited_reference(tmp_path, drop=("conv_in.weight", "conv_in.bias", "class_embedding.weight"))
    assert_refused_without_output(folder, tmp_path, capsys, [
        str(folder / WEIGHTS), "3 missing key(s) (class_embedding.weight, conv_in.bias, conv_in.weight)",
        "randomly initialised", "re-download or re-export"])


def test_unexpected_key_in_the_reference_weights_is_refused(tmp_path, capsys):
    folder = edited_reference(tmp_path, add={"mid_block.extra.weight": torch.zeros(4)})
    assert_refused_without_output(folder, tmp_path, capsys, [
        "1 unexpected key(s) (mid_block.extra.weight)", "would be ignored"])


def test_unedited_copy_still_samples(tmp_path, capsys):
    # the control: the copy itself (same files, other folder) is accepted
    folder = edited_reference(tmp_path)
    out = tmp_path / "g.png"
    rc, err = run_cli(["sample", "--model", str(folder), "-n", "2", "--steps", "1", "-o", str(out)], capsys)
    assert rc == 0 and out.exists(), err


def test_cross_attention_unet_with_missing_and_extra_keys(tmp_path, capsys):
    """A UNet2DConditionModel the project was not written around, saved by diffusers itself."""
    folder = save_unet_folder(tmp_path / "cond", tiny_unet_cond())
    sd = load_file(str(folder / WEIGHTS))
    dropped = sorted(k for k in sd if k.startswith("conv_out."))
    for k in dropped:
        del sd[k]
    sd["foo.bar"] = torch.ones(2)
    save_file(sd, str(folder / WEIGHTS))
    cond = tmp_path / "emb.safetensors"
    save_file({"cond": torch.randn(1, 5, 12)}, str(cond))
    assert_refused_without_output(folder, tmp_path, capsys, [
        f"{len(dropped)} missing key(s) ({', '.join(dropped)})", "1 unexpected key(s) (foo.bar)"],
        extra=["--cfg", "1", "--cond-file", str(cond)])


class _RunsCode:
    """Unpickling this creates a file: stands in for a pickle that runs arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_bin_is_not_run(tmp_path):
    folder = tmp_path / "u"
    tiny_unet2d().save_pretrained(folder, safe_serialization=False)
    (folder / WEIGHTS).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    sd = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    sd["payload"] = _RunsCode(marker)
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    from tests.helpers import save_scheduler

    save_scheduler(folder)
    with pytest.raises(ModelLoadError, match="pickled Python objects besides tensors.*convert it to safetensors"):
        load_model(str(folder))
    assert not marker.exists()


def test_tensor_only_bin_loads_and_is_checked_for_keys(tmp_path):
    folder = tmp_path / "u"
    unet = tiny_unet2d().eval()
    unet.save_pretrained(folder, safe_serialization=False)
    from tests.helpers import save_scheduler

    save_scheduler(folder)
    m = load_model(str(folder))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(m.eps_model()(x, t, y), unet(x, t, class_labels=y).sample, rtol=0, atol=0)
    sd = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    del sd["conv_in.weight"]
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\) \(conv_in.weight\)"):
        load_model(str(folder))
