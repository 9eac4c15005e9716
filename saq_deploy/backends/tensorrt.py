"""TensorRT backend: what ``build_engine`` and ``load_engine`` call. TensorRT is imported lazily,
inside functions only, so this module imports on any machine.

    <artifact>/engine-tensorrt/   (the default folder: registry.TensorRTBackend.default_engine_dir)
      model.plan          the serialized engine (tied to this TensorRT version and GPU)
      audit.json          precision audit from the engine inspector (saq-deploy inspect prints it)
      engine_info.json    the inspector's raw layer information (JSON, DETAILED verbosity)
      manifest.json       build: TensorRT version, GPU name + compute capability, profile (+ sha256),
                          ONNX and calibrated-state hashes, flags, shapes, build time

Build: :mod:`saq_deploy.backends.tensorrt_build`; load checks and runner:
:mod:`saq_deploy.backends.tensorrt_runtime`; profiles: :mod:`saq_deploy.backends.trt_profile`;
audit parsing: :mod:`saq_deploy.backends.trt_audit`.
"""

from __future__ import annotations

from saq_deploy.backends.tensorrt_build import (
    AUDIT_FILE,
    PLAN_FILE,
    build,
    preflight,
    refuse_lint_errors,
    require_builder,
    typing_plan,
)
from saq_deploy.backends.tensorrt_runtime import TrtRunner, check_compat, load_runner, running_info
from saq_deploy.backends.trt_audit import audit_layers, format_audit
from saq_deploy.backends.trt_profile import BuildProfile, load_profile, resolve_profile

__all__ = ["AUDIT_FILE", "PLAN_FILE", "BuildProfile", "TrtRunner", "audit_layers", "build", "check_compat",
           "format_audit", "load_profile", "load_runner", "preflight", "refuse_lint_errors",
           "require_builder", "resolve_profile", "running_info", "typing_plan"]
