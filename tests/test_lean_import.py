"""`import saq_deploy` (and the CLI entry point) must not pull heavy optional runtimes."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "openvino", "tensorrt", "modelopt", "polygraphy", "fastapi", "uvicorn", "starlette")


@pytest.mark.parametrize("module", ["saq_deploy", "saq_deploy.cli.app", "saq_deploy.generate",
                                    "saq_deploy.samplers.registry", "saq_deploy.api",
                                    "saq_deploy.serve", "saq_deploy.cli.serve"])
def test_no_heavy_imports(module):
    code = (f"import sys, {module}; bad = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{module} imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_package_import_is_light():
    code = "import sys, saq_deploy; print('diffusers' in sys.modules, 'onnx' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.stdout.split() == ["False", "False"]
