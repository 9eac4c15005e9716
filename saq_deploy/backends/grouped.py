"""Timestep-group engines: K engines (one per activation-step group) behind one Runner.

An export with per-group graphs (``saq_deploy.export.groups``) is built group by group with the
backend's own ``build`` into subfolders of the engine folder, and loaded as K runners:

    <engine>/g0/model.onnx (ONNX Runtime) | model.blob (OpenVINO) | model.plan + audit (TensorRT)
    <engine>/g1/...
    <engine>/manifest.json   files (every group's, "g{g}/<name>" -> sha256, checked on load),
                             engine_file / build of group 0, and "timestep_groups": K, T, each
                             group's t-range, engine file, build and source graph (+ sha256)

Nothing here names a backend: each group is one ``Backend.build`` / ``check_manifest`` / ``load`` /
``describe`` on that group's subfolder with a per-group view of the manifest (``group_manifest``).
:class:`GroupedRunner` maps ``feeds["timestep"]`` to groups with the very function the fake-quant
model uses (``saq_deploy.quant.timestep.timestep_groups``) and runs each group's rows on its runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saq_deploy.backends.registry import Backend, Built, Runner
from saq_deploy.errors import ModelLoadError

SECTION = "timestep_groups"


def group_dir(g: int) -> str:
    return f"g{g}"


def is_grouped(manifest: dict) -> bool:
    """An export or engine manifest with one graph / engine per timestep group."""
    sec = manifest.get(SECTION) or {}
    return bool(sec.get("graphs")) or bool(sec.get("engines"))


def build_groups(spec: Backend, src: Path, tmp: Path, export_dir: Path, em: dict, ctx: Any,
                 **opts) -> tuple[Built, dict]:
    """Build each group's graph (the counterpart of ``src``, the backend's single-graph source) into
    ``tmp/g{g}/``; returns the combined Built (files as ``g{g}/<name>``, group 0's build and engine
    file) and the engine manifest's ``timestep_groups`` section."""
    from saq_deploy.utils.io import sha256_file

    sec = em[SECTION]
    files: dict[str, str] = {}
    engines, first = [], None
    for entry in sec["graphs"]:
        g = entry["group"]
        mapped = entry["files"].get(Path(src).name)
        if mapped is None:
            raise ModelLoadError(f"the export's timestep group {g} has no counterpart of '{Path(src).name}' "
                                 f"(it has {', '.join(sorted(entry['files']))}); re-export the artifact")
        gsrc = export_dir / mapped["file"]
        if not gsrc.is_file() or sha256_file(gsrc) != mapped["sha256"]:
            raise ModelLoadError(f"export file '{gsrc}' is missing or does not match its manifest; re-export "
                                 "with saq-deploy export")
        sub = tmp / group_dir(g)
        sub.mkdir()
        built = spec.build(gsrc, sub, export_dir, em, ctx, **opts)
        files.update({f"{group_dir(g)}/{name}": h for name, h in built.files.items()})
        engines.append({"group": g, "t_range": entry["t_range"], "dir": group_dir(g),
                        "engine_file": built.engine_file, "files": dict(built.files), "build": built.build,
                        "source_onnx": str(gsrc), "source_sha256": mapped["sha256"]})
        first = first or built
    section = {"groups": sec["groups"], "num_train_timesteps": sec["num_train_timesteps"],
               "assign": sec.get("assign"), "weights_sha256": sec.get("weights_sha256"),
               "weights_identical": sec.get("weights_identical"), "engines": engines}
    for key in ("bounds", "act_bits"):  # explicit boundaries / per-group activation bits, when set
        if key in sec:
            section[key] = sec[key]
    for e, entry in zip(engines, sec["graphs"], strict=True):
        if "act_bits" in entry:
            e["act_bits"] = entry["act_bits"]
    combined = Built(files, first.build, f"{group_dir(0)}/{first.engine_file}", first.max_batch)
    return combined, section


def group_manifest(manifest: dict, g: int) -> tuple[str, dict]:
    """(subfolder, manifest as the backend sees group g's engine there: its engine file, files, build)."""
    e = manifest[SECTION]["engines"][g]
    return e["dir"], {**manifest, "engine_file": e["engine_file"], "files": e["files"], "build": e["build"]}


def groups_of(manifest: dict) -> list[tuple[Path, dict]]:
    return [group_manifest(manifest, g) for g in range(len(manifest[SECTION]["engines"]))]


def check_groups(spec: Backend, path: Path, manifest: dict, *, force: bool = False) -> list[str]:
    """``Backend.check_manifest`` of every group's engine (this machine can run each)."""
    notes: list[str] = []
    for sub, m in groups_of(manifest):
        notes += spec.check_manifest(Path(path) / sub, m, force=force)
    return notes


def open_runner(spec: Backend, path: Path, manifest: dict, **kw) -> Runner:
    """The backend's runner, or a GroupedRunner over one per group for a grouped engine."""
    if not is_grouped(manifest):
        return spec.load(path, manifest, **kw)
    sec = manifest[SECTION]
    runners: list[Runner] = []
    try:
        for sub, m in groups_of(manifest):
            runners.append(spec.load(Path(path) / sub, m, **kw))
    except BaseException:
        for r in runners:
            r.close()
        raise
    return GroupedRunner(runners, int(sec["num_train_timesteps"]), sec.get("bounds", ()))


def describe_groups(spec: Backend, path: Path, manifest: dict) -> tuple[str, str, dict]:
    """``saq-deploy inspect`` of a grouped engine: K groups, then each group's own description."""
    sec = manifest[SECTION]
    heads, bodies, data = [], [], {"timestep_groups": sec["groups"], "groups": []}
    for e, (sub, m) in zip(sec["engines"], groups_of(manifest), strict=True):
        head, body, d = spec.describe(Path(path) / sub, m)
        lo, hi = e["t_range"]
        bits = f", A{e['act_bits']}" if "act_bits" in e else ""
        heads.append(f"group {e['group']} (t in [{lo:g}, {hi:g}){bits}): {head}")
        bodies.append(f"-- group {e['group']} --\n{body}")
        data["groups"].append({"group": e["group"], "t_range": e["t_range"], **d})
    head = (f"{sec['groups']} timestep groups over [0, {sec['num_train_timesteps']}), one {spec.title} engine each "
            f"(same integer weights: {str(sec.get('weights_sha256'))[:12]})\n" + "\n".join(heads))
    return head, "\n".join(bodies), data


class GroupedRunner:
    """K runners, one per timestep group: a call's rows go to their group's runner (split and
    scattered back in order when the rows of a batch fall in different groups)."""

    def __init__(self, runners: list[Runner], num_train_timesteps: int, bounds=()):
        from saq_deploy.quant.timestep import TimestepGroups

        self.runners = list(runners)
        self.num_train_timesteps = num_train_timesteps
        self.groups = TimestepGroups(len(self.runners), bounds)  # the export's boundaries, if any
        dev = getattr(self.runners[0], "device", None)
        if dev is not None:
            self.device = dev

    def group_ids(self, timestep: torch.Tensor) -> torch.Tensor:
        from saq_deploy.quant.timestep import timestep_groups

        return timestep_groups(timestep.detach().cpu(), self.groups, self.num_train_timesteps)

    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        ids = self.group_ids(feeds["timestep"])
        if ids.numel() == 1 or bool((ids == ids[0]).all()):
            return self.runners[int(ids[0])].run(feeds, out_shape)
        out = None
        for g in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == g).reshape(-1)
            part = {k: v[rows.to(v.device)] for k, v in feeds.items()}
            res = self.runners[g].run(part, (len(rows), *out_shape[1:]))
            if out is None:
                out = torch.empty(out_shape, dtype=res.dtype, device=res.device)
            out[rows.to(res.device)] = res
        return out

    def close(self) -> None:
        for r in self.runners:
            r.close()


def describe_engine(spec: Backend, path: Path, manifest: dict) -> tuple[str, str, dict]:
    """``Backend.describe``, or ``describe_groups`` for a grouped engine."""
    return describe_groups(spec, path, manifest) if is_grouped(manifest) else spec.describe(path, manifest)
