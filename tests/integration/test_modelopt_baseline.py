"""`modelopt-int8`: NVIDIA ModelOpt's INT8 calibration rendered into our artifact format.

The ModelOpt tests skip where `nvidia-modelopt` is not installed (CI installs only the dev extra);
the refusal test runs everywhere. Oracles are independent of ModelOpt: plain forward hooks on the
FP UNet over the same calibration records, and max|w| per output channel.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.errors import BackendUnavailableError, ConfigError

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8}

needs_modelopt = pytest.mark.skipif(
    importlib.util.find_spec("modelopt") is None,
    reason="nvidia-modelopt is not installed (pip install 'saq-deploy[modelopt]')")


def tiny(bits: str = "w8a8", **extra) -> Recipe:
    return Recipe().with_overrides({**TINY, "calibration.method": "modelopt-int8", "quant.bits": bits, **extra})


def _fp_input_amax(unet: torch.nn.Module, point, layer_names: set[str]) -> dict[str, float]:
    """max|input| of each named layer of the FP UNet over ``point``, via plain forward hooks."""
    from saq_deploy.calibrate.steps import Records

    amax: dict[str, float] = {}

    def hook(name: str):
        def fn(module: torch.nn.Module, args: tuple) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in unet.named_modules() if n in layer_names]
    try:
        with torch.no_grad():
            for feed in Records.feeds(unet.eval(), point, 1, 1000):
                feed()
    finally:
        for h in handles:
            h.remove()
    return amax


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(artifact folder, the student records (x, t, labels) the run fed to ModelOpt)."""
    from saq_deploy.calibrate import steps

    seen: list = []

    class SpyRecords(steps.Records):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self.student)

    out = tmp_path_factory.mktemp("mo") / "int8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "Records", SpyRecords)
        calibrate(tiny(), out)
    assert len(seen) == 1
    return out, seen[0]


@pytest.fixture(scope="module")
def loaded_artifact(calibrated):
    return load_artifact(calibrated[0])


@needs_modelopt
@pytest.mark.slow
def test_artifact_written(calibrated):
    out = calibrated[0]
    for name in ("calibrated.safetensors", "manifest.json", "recipe.json", "report.md"):
        assert (out / name).exists(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "modelopt-int8" and m["bits"] == "w8a8" and m["block_losses"] == []
    assert m["quant_config"]["weight"]["scale_method"] == "minmax"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no partial/tmp left


@needs_modelopt
@pytest.mark.slow
def test_scales_equal_max_over_127(calibrated, loaded_artifact):
    out, records = calibrated
    state = load_file(str(out / "calibrated.safetensors"))
    layers = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_scale")}
    assert len(layers) > 20
    # weights: ModelOpt's per-output-channel amax / 127
    fp_unet = loaded_artifact.fp_unet
    fp = dict(fp_unet.named_modules())
    for name in layers:
        w = fp[name].weight.detach()
        want = w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127
        got = state[f"{name}.weight_scale"]
        assert got.shape[0] == w.shape[0] and got.numel() == w.shape[0], name
        torch.testing.assert_close(got.reshape(-1), want, rtol=1e-6, atol=0, msg=name)
    # activations: max|input| over the same calibration records / 127, one step per layer
    oracle = _fp_input_amax(fp_unet, records, layers)
    steps = {k.rsplit(".", 1)[0]: v for k, v in state.items() if k.endswith(".act_step")}
    assert set(steps) == set(oracle) == layers
    for name in layers:
        torch.testing.assert_close(steps[name], torch.tensor([oracle[name] / 127]), rtol=1e-5, atol=0,
                                   msg=name)


@needs_modelopt
@pytest.mark.slow
def test_loaded_artifact_close_to_fp(calibrated, loaded_artifact):
    # on the sampler's own points (x_t, t, label): INT8 differs from FP, but only slightly. (Fresh
    # N(0, 1) inputs, or the t=999 points alone, give rel-L2 ~0.13 here for our minmax method too.)
    cal = loaded_artifact
    x, t, y = calibrated[1]
    with torch.no_grad():
        eps = cal.eps_model()(x, t, y)
        fp = cal.fp_unet(x, t, class_labels=y).sample
    rel = float((eps - fp).norm() / fp.norm())
    assert 0.001 < rel < 0.1, rel


@needs_modelopt
def test_modelopt_refuses_other_bits(tmp_path):
    with pytest.raises(ConfigError, match="--bits w8a8"):
        calibrate(tiny(bits="w4a8"), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_without_modelopt_refused(tmp_path, monkeypatch):
    import saq_deploy.calibrate.modelopt_baseline as mb

    monkeypatch.setattr(mb, "modelopt_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"saq-deploy\[modelopt\]"):
        calibrate(tiny(), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
