"""The backend registry: every backend has its parts, one list of names feeds every CLI choice, and
each backend's one default engine folder is what every consumer reads. No runtime is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from saq_deploy.backends.registry import BACKENDS, REGISTRY, Backend, Runner, default_engine_dir, get_backend
from saq_deploy.errors import ConfigError
from saq_deploy.export.qdq import TARGETS

PARTS = ("build", "load", "describe", "export_target")


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_has_its_parts(name):
    b = get_backend(name)
    assert b.name == name and b.title and b.distributions and b.cache_tag
    assert b.device in ("cpu", "cuda")
    for part in PARTS:  # implemented by the backend itself, not the base class's NotImplementedError
        assert getattr(type(b), part) is not getattr(Backend, part), f"{name} lacks {part}"
    w8a8 = {"quant_config": {"act": {"bits": 8}}}
    assert b.export_target(w8a8) in TARGETS
    assert b.default_engine_dir("runs/x") == Path("runs/x") / b.engine_dir_name


def test_names_and_folders_are_distinct():
    assert len({b.engine_dir_name for b in REGISTRY.values()}) == len(REGISTRY)
    assert len({b.cache_tag for b in REGISTRY.values()}) == len(REGISTRY)
    assert set(BACKENDS) == {"onnxruntime", "tensorrt", "openvino"}


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        get_backend("tpu")
    msg = str(e.value)
    assert "\n" not in msg and "'tpu'" in msg and all(n in msg for n in BACKENDS)
    with pytest.raises(ConfigError):
        get_backend(None)


def test_cli_choices_come_from_the_registry():
    from saq_deploy.cli.engine import Backend as CliBackend
    from saq_deploy.cli.serve import ServeBackend

    assert [m.value for m in CliBackend] == list(BACKENDS)
    assert [m.value for m in ServeBackend] == [*BACKENDS, "torch"]


def test_cli_rejects_an_unknown_backend_naming_the_choices(tmp_path, capsys):
    from saq_deploy.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["build-engine", str(tmp_path), "--backend", "tpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tpu" in err and "openvino" in err


def test_tensorrt_default_folder_is_the_same_for_build_and_every_consumer():
    """The bug this replaced: build-engine wrote engines/out/<artifact>-<profile>/ while validate,
    bench and serve read <artifact>/engine-tensorrt. Now one function owns the folder."""
    from saq_deploy.serve.model import default_engine_dir as serve_dir

    art = Path("runs/w8a8")
    for name in BACKENDS:
        assert serve_dir(art, name) == default_engine_dir(art, name) == get_backend(name).default_engine_dir(art)
    assert default_engine_dir(art, "tensorrt") == art / "engine-tensorrt"
    assert default_engine_dir(art, "openvino") == art / "engine-openvino"
    assert default_engine_dir(art, "onnxruntime") == art / "engine"


def test_no_consumer_keeps_its_own_default_folder():
    """Only the registry may spell the engine folder names (a second copy is how the TensorRT bug
    came about)."""
    root = Path(__file__).resolve().parents[2] / "saq_deploy"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "registry.py" and ('"engine-tensorrt"' in p.read_text() or "engines/out" in p.read_text())]
    assert offenders == []


def test_force_is_refused_where_the_backend_has_no_use_for_it():
    get_backend("tensorrt").check_force(True)
    for name in ("onnxruntime", "openvino"):
        with pytest.raises(ConfigError, match="TensorRT plans only"):
            get_backend(name).check_force(True)


def test_runners_satisfy_the_protocol():
    from saq_deploy.backends.onnxruntime import OrtRunner
    from saq_deploy.backends.openvino import OvRunner
    from saq_deploy.backends.tensorrt_runtime import TrtRunner

    for cls in (OrtRunner, OvRunner, TrtRunner):
        assert callable(cls.run) and callable(cls.close), cls
    assert not isinstance(object(), Runner)


@pytest.mark.parametrize("module", ["saq_deploy.backends.registry", "saq_deploy.backends.openvino",
                                    "saq_deploy.cli.engine"])
def test_backend_modules_import_no_runtime(module):
    code = (f"import sys, {module}; bad = [m for m in ('onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{module} imported {proc.stdout.strip()} {proc.stderr[-300:]}"


def test_prepare_keys_cpu_engines_by_runtime():
    pytest.importorskip("openvino", reason="needs the 'openvino' extra (in 'dev')")
    from importlib.metadata import version

    from saq_deploy.serve.prepare import cache_key, main

    state = "ab" * 32
    ort, ov = cache_key("onnxruntime", state), cache_key("openvino", state)
    assert ort != ov and f"-ov{version('openvino')}-" in ov and f"-ort{version('onnxruntime')}-" in ort
    with pytest.raises(SystemExit) as e:  # argparse choices are the registry's names
        main(["runs/x", "--backend", "tpu"])
    assert e.value.code == 2
