"""Bad input to export / build-engine / validate / sample --engine: one clear line, exit 1,
nothing half-written."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from saq_deploy.backends import build_engine, load_engine
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError
from tests.integration.test_calibrate import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8"), out)
    build_engine(out, "onnxruntime")
    return out


def _err(args, capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_non_onnx_file(art, tmp_path, capsys):
    junk = tmp_path / "model.onnx"
    junk.write_text("this is not a protobuf")
    before = _siblings(art / "engine")
    err = _err(["build-engine", str(art), "--onnx", str(junk), "-o", str(tmp_path / "e")], capsys)
    assert "not an ONNX model" in err
    assert not (tmp_path / "e").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert _siblings(art / "engine") == before


def test_onnx_without_expected_inputs(art, tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(g), str(other))
    err = _err(["build-engine", str(art), "--onnx", str(other), "-o", str(tmp_path / "e")], capsys)
    assert "has inputs ['x']" in err and "sample" in err
    assert not (tmp_path / "e").exists()


def test_artifact_hash_mismatch(art, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(art, bad, ignore=shutil.ignore_patterns("engine", "onnx", "validation"))
    state = bad / "calibrated.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    err = _err(["build-engine", str(bad)], capsys)
    assert "does not match the hash in its manifest" in err
    assert not (bad / "engine").exists() and not (bad / "onnx" / "onnxruntime-cpu").exists()
    _err(["export", str(bad)], capsys)


def test_engine_from_other_calibration(art, tmp_path, capsys):
    other = tmp_path / "other"
    calibrate(tiny(method="minmax", bits="w8a8", **{"calibration.seed": 7}), other)
    err = _err(["validate", str(other), "--engine", str(art / "engine")], capsys)
    assert "different calibration" in err
    assert not (other / "validation").exists()


def test_engine_for_other_shapes(art):
    eps = load_engine(art / "engine").eps_model()
    with pytest.raises(ConfigError, match=r"built for samples of shape \(1, 16, 16\)"):
        eps(torch.randn(2, 1, 32, 32), torch.tensor([10.0, 20.0]), torch.tensor([1, 2]))


def test_tampered_engine_file(art, tmp_path, capsys):
    eng = tmp_path / "engine"
    shutil.copytree(art / "engine", eng)
    with open(eng / "model.onnx", "ab") as f:
        f.write(b"\0")
    err = _err(["sample", "--engine", str(eng), "-n", "2", "-o", str(tmp_path / "g.png")], capsys)
    assert "does not match the hash" in err and not (tmp_path / "g.png").exists()


def test_not_an_engine_and_bad_options(art, tmp_path, capsys):
    assert "not an engine folder" in _err(["sample", "--engine", str(tmp_path), "-o", str(tmp_path / "g.png")], capsys)
    assert "--max-batch" in _err(["build-engine", str(art), "--max-batch", "0", "-o", str(tmp_path / "e")], capsys, 2)
    assert "not a calibrated artifact" in _err(["build-engine", str(tmp_path)], capsys)
