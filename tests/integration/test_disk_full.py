"""A full disk during export / build-engine is reported as such, naming the output (issue 15 item 6),
not as "INVALID_PROTOBUF ... of the source model.onnx", and leaves no partial output.

A real EFBIG from the kernel: RLIMIT_FSIZE below the size of the file being written, SIGXFSZ ignored
so the write fails instead of killing the process (the same path as ENOSPC/EDQUOT in main())."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from saq_deploy.backends import build_engine
from saq_deploy.calibrate.run import calibrate
from saq_deploy.utils.io import sha256_file
from tests.integration.test_calibrate import tiny

pytestmark = pytest.mark.slow
LIMIT = 1 << 20  # the reference model's ONNX files are 2-8 MB; manifests and the artifact are read only


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8"), out)
    build_engine(out, "onnxruntime")  # also exports onnx/onnxruntime-cpu/
    return out


def run_limited(args: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import resource, signal
        from saq_deploy.cli.app import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
        main({args!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=900)


def assert_one_line(proc, fragment):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "INVALID_PROTOBUF" not in proc.stderr and "unexpected" not in proc.stderr


def test_build_engine_on_a_full_disk(art, tmp_path):
    out = tmp_path / "engine"
    proc = run_limited(["build-engine", str(art), "-o", str(out)])
    assert_one_line(proc, f"file too large for this file system or limit while writing {out / 'model.onnx'}: "
                          "free space or choose another output folder")
    assert list(tmp_path.iterdir()) == []  # no engine, no temp folder


def test_export_on_a_full_disk_keeps_the_previous_export(art):
    onnx_dir = art / "onnx"
    before = sha256_file(onnx_dir / "onnxruntime-cpu" / "model.onnx")
    proc = run_limited(["export", str(art), "--target", "onnxruntime-cpu", "--calib-samples", "1"])
    assert_one_line(proc, f"file too large for this file system or limit while writing {onnx_dir}: "
                          "free space or choose another output folder")
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["onnxruntime-cpu"]  # no temp folders left
    assert sha256_file(onnx_dir / "onnxruntime-cpu" / "model.onnx") == before


def test_ort_write_failure_is_an_os_error_naming_the_output(tmp_path):
    """The ORT step alone (fast): its INVALID_PROTOBUF 'serialization failed' becomes the kernel's errno."""
    from saq_deploy.models.loading import load_model

    src = tmp_path / "fp32.onnx"
    m = load_model("builtin:digits")
    from saq_deploy.export.torch_export import export_unet_onnx

    export_unet_onnx(m.unet, m.kind, m.sample_shape, src)
    dst = tmp_path / "out" / "model.onnx"
    dst.parent.mkdir()
    code = textwrap.dedent(f"""
        import errno, resource, signal
        from pathlib import Path
        from saq_deploy.backends.onnxruntime import optimize_model
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
        try:
            optimize_model(Path({str(src)!r}), Path({str(dst)!r}))
        except OSError as e:
            print(e.errno == errno.EFBIG, e.filename)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.stdout.split() == ["True", str(dst)], proc.stdout + proc.stderr
    assert list(dst.parent.iterdir()) == []  # the partial file is removed
