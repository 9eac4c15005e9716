"""Timestep-group graphs: one static Q/DQ graph per activation-step group.

An artifact calibrated with ``quant.act_timestep_groups = K`` holds K steps per activation (and
attention-matmul) quantizer, one per equal-width timestep group over [0, T), or per group between
``quant.act_timestep_bounds``, each at its ``quant.act_group_bits`` width when given
(``saq_deploy.quant.timestep.timestep_groups``). A static Q/DQ graph holds one scale per tensor,
so the deployable form is K graphs beside the collapsed one, in the same export folder:

    onnx/<target>/model.onnx          collapsed: each quantizer's largest step (one graph)
    onnx/<target>/model.g{g}.onnx     group g: group g's steps, the same integer weights
    onnx/<target>/model.g{g}.fp16.onnx   (tensorrt) the FP16-typed sibling of group g's graph

The manifest's ``timestep_groups`` section says K, T, the mode, each group's t-range, files and
hashes (and, when set, the bounds and each group's activation bits), and the digest of the weight
initializers, which is the same in every graph. Export-time scales (conv outputs, residual Adds)
are observed once, on the collapsed graph, and shared.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from saq_deploy.errors import ConfigError

PER_GROUP, COLLAPSED = "per-group", "collapsed"
MODES = (PER_GROUP, COLLAPSED)  # the CLI's --timestep-groups choices (onnx is imported lazily below)

if TYPE_CHECKING:
    import onnx


def resolve_mode(requested: str | None, groups: int) -> str:
    """The export mode: per-group by default when the artifact has K > 1 groups (what matches the
    fake-quant model), collapsed when asked for one graph (or when there is only one group)."""
    if requested is not None and requested not in MODES:
        raise ConfigError(f"unknown timestep-groups mode '{requested}'; choose one of {', '.join(MODES)}")
    if groups <= 1:
        return COLLAPSED
    return requested or PER_GROUP


def group_file(name: str, g: int) -> str:
    """``model.onnx`` -> ``model.g0.onnx``, ``model.fp16.onnx`` -> ``model.g0.fp16.onnx``."""
    stem, dot, rest = name.partition(".")
    return f"{stem}.g{g}{dot}{rest}"


def t_ranges(groups: int, num_train_timesteps: int) -> list[list[float]]:
    """[lo, hi) of each group as ``timestep_groups`` assigns t: floor(t * K / T), or by the
    boundaries of a ``TimestepGroups`` passed as ``groups``."""
    from saq_deploy.quant.timestep import TimestepGroups

    g = groups if isinstance(groups, TimestepGroups) else TimestepGroups(groups)
    return g.t_ranges(num_train_timesteps)


def weight_digest(model: onnx.ModelProto) -> str:
    """sha256 over the weight initializers: every DequantizeLinear whose data is a stored integer
    tensor other than INT32 (the weight codes) with its scale and zero point, by name. Activation
    Q/DQ scales and the INT32 conv biases (scale = input x weight scale) are not weights."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    names = set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type != TensorProto.INT32:
            names.update(i for i in n.input if i in inits)
    h = hashlib.sha256()
    for name in sorted(names):
        t = inits[name]
        h.update(name.encode())
        h.update(t.SerializeToString())
    return h.hexdigest()


def num_train_timesteps(manifest: dict) -> int:
    """T the calibration grouped timesteps over (the quant config it stored)."""
    return int(manifest["quant_config"].get("num_train_timesteps", 1000))


def grouping(manifest: dict):
    """The artifact's timestep groups (count and boundaries) from its stored quant config."""
    from saq_deploy.quant.timestep import TimestepGroups

    return TimestepGroups.from_quant_config(manifest["quant_config"])


def write_group_graphs(tmp: Path, mode: str, plan, manifest: dict, *, target: str, fp16: bool,
                       build: Callable, fp16_of: Callable) -> tuple[dict[str, str], dict | None]:
    """Write group g's graph (``build(plan.for_group(g))``) for each g into ``tmp``; returns the
    files (name -> sha256) and the manifest section (None: the artifact has no groups)."""
    import onnx

    from saq_deploy.utils.io import sha256_file

    k = plan.timestep_groups
    if k <= 1:
        return {}, None
    T = num_train_timesteps(manifest)
    grp = grouping(manifest)
    if int(grp) != k:  # no boundaries stored for these K groups: the equal-width rule, as before
        if grp.bounds:
            raise ConfigError(f"the quant config's timestep bounds {list(grp.bounds)} make {int(grp)} groups, "
                              f"the calibrated quantizers have {k}")
        grp = type(grp)(k)
    section = {"mode": mode, "groups": k, "num_train_timesteps": T, "assign": grp.assign_rule(),
               "t_ranges": t_ranges(grp, T), "graphs": []}
    bits = plan.group_act_bits()
    if grp.bounds:  # keys absent for equal-width groups at one width: manifests as before
        section["bounds"] = list(grp.bounds)
    if bits is not None:
        section["act_bits"] = bits
    if mode == COLLAPSED:
        return {}, section
    files, digests = {}, set()
    for g, rng in enumerate(section["t_ranges"]):
        model = build(plan.for_group(g))
        digests.add(weight_digest(model))
        entry = {"group": g, "t_range": rng, "files": {}}
        if bits is not None:
            entry["act_bits"] = bits[g]
        onnx.save(model, str(tmp / group_file("model.onnx", g)))
        written = ["model.onnx"]
        if fp16:
            onnx.save(fp16_of(model), str(tmp / group_file("model.fp16.onnx", g)))
            written.append("model.fp16.onnx")
        model = None  # not alive while the next group's graph is built
        gc.collect()
        for name in written:  # keyed by the single graph's name: a backend's source maps across
            f = group_file(name, g)
            files[f] = sha256_file(tmp / f)
            entry["files"][name] = {"file": f, "sha256": files[f]}
        section["graphs"].append(entry)
    if len(digests) != 1:  # by construction: the groups differ in activation steps only
        raise ConfigError(f"the {k} timestep-group graphs of {target} have different weights; report this bug")
    section["weights_sha256"], section["weights_identical"] = digests.pop(), True
    return files, section
