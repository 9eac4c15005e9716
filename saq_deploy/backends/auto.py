"""``build-engine`` without ``--backend``: build the engine of the backend that is fastest *here*.

Which CPU backend is faster depends on the model and the CPU (docs/results/speed-peers.md: our ONNX
Runtime engine ahead of our OpenVINO engine on the small reference model; the order can flip on
bigger UNets), so no fixed table can be right for a user's model: :func:`pick_backend` measures
(docs/design/deployment.md §6.2).

    TensorRT builder + a CUDA GPU          -> tensorrt, not timed (the registry's own preflight)
    one CPU backend usable (onnxruntime)   -> that one; the note says why the others are not
    two or more CPU backends               -> build each the normal way into one temp folder beside
                                              the output, open each, time interleaved rounds at batch
                                              1 on the engine's own input shapes, keep the fastest

The kept engine's manifest records the pick (``"auto_pick"``: candidates' median ms/call, rounds,
batch), re-sealed like every engine manifest; the losers' folders are removed. Runtimes are
imported lazily (through the registry), so this module imports on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saq_deploy.backends.registry import REGISTRY, Backend
from saq_deploy.errors import BackendUnavailableError, BadOptionError, SaqError

ROUNDS = 5
WARMUP = 3
BATCH = 1
ROUND_S = 0.1  # a round times enough calls to last about this long (1 call for a big UNet)
MAX_CALLS_PER_ROUND = 20
TEXT_LENGTH = 77  # encoder_hidden_states length when the export leaves it dynamic (CLIP's)


def usable(device: str, *, profile=None, max_batch: int | None = None) -> tuple[list[Backend], dict[str, str]]:
    """The registered backends for ``device`` ("cpu" / "cuda") whose runtime (and GPU) is here,
    by the backend's own preflight; and, for the others, why not (its one-line message)."""
    ok, why = [], {}
    for spec in REGISTRY.values():
        if spec.device != device:
            continue
        try:
            spec.preflight(profile=profile if spec.takes_profile else None, max_batch=max_batch)
        except BackendUnavailableError as e:
            why[spec.name] = str(e)
            continue
        ok.append(spec)
    return ok, why


def pick_backend(artifact: str | Path, output: str | Path | None = None, *,
                 note: Callable[[str], None] | None = None, rounds: int = ROUNDS, warmup: int = WARMUP,
                 profile: str | Path | None = None, **opts) -> tuple[str, Path]:
    """Build the engine of the fastest usable backend for ``artifact`` and return (backend, folder).
    ``output``: the engine folder (default: the picked backend's default folder). ``opts`` go to
    :func:`~saq_deploy.backends.build.build_engine` (onnx_file, providers, opt_level, max_batch,
    threads, parity). ``note`` hears the pick (one line) and build-engine's own notes."""
    from saq_deploy.backends.build import _refuse_foreign_output, _replace, build_engine
    from saq_deploy.utils.io import name_intended, owned_temp_prefix, remove_stale_temps
    from saq_deploy.utils.versions import cpu_model

    say = note or (lambda line: None)
    artifact = Path(artifact)
    if rounds < 1 or warmup < 0:
        raise BadOptionError(f"auto pick needs rounds >= 1 and warmup >= 0, got {rounds} / {warmup}")
    gpu, gpu_why = usable("cuda", profile=profile, max_batch=opts.get("max_batch"))
    if gpu:
        cands, why = gpu[:1], {}
        headline = (f"picked {gpu[0].name} ({gpu[0].title} and a CUDA GPU are usable here; not timed against the "
                    "CPU backends)")
    else:
        cands, why = usable("cpu")
        if profile is not None:  # before any export: the profile would be ignored
            not_here = "; ".join(v.split("; ")[0] for v in gpu_why.values())
            raise BadOptionError(f"--profile (a TensorRT build profile) does not apply to --backend "
                                 f"{' or '.join(c.name for c in cands)}, the backends usable here ({not_here}): "
                                 "drop it, or pass --backend tensorrt where TensorRT and a CUDA GPU are")
        headline = ""
    outs = {c.name: Path(output) if output else c.default_engine_dir(artifact) for c in cands}
    for out in outs.values():  # a user's file or folder is never replaced, and refused before the builds
        _refuse_foreign_output(out)
    first = outs[cands[0].name]
    first.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(first.parent, (f".{first.name}-", f".{first.name}-old-"), "an interrupted build-engine", note)
    tmp = Path(tempfile.mkdtemp(dir=first.parent, prefix=owned_temp_prefix(f".{first.name}-")))
    try:
        built: dict[str, Path] = {}
        for i, c in enumerate(cands):
            try:
                built[c.name] = build_engine(artifact, c.name, tmp / c.engine_dir_name, note=note,
                                             profile=profile if c.takes_profile else None, **opts)
            except SaqError as e:
                if i == 0:  # the first (onnxruntime on a CPU) fails the way an explicit build would
                    raise
                why[c.name] = f"its build failed: {e}"  # e.g. a graph OpenVINO cannot compile
        ms: dict[str, float] = {}
        calls = 0
        if len(built) > 1:
            ms, calls = time_engines(built, rounds=rounds, warmup=warmup)
            name = min(ms, key=ms.get)
            rest = ", ".join(f"{k} ({v:.1f} ms)" for k, v in ms.items() if k != name)
            headline = (f"picked {name} ({ms[name]:.1f} ms/call) over {rest} on this CPU, batch {BATCH}, "
                        f"median of {rounds} interleaved rounds")
        else:
            name = next(iter(built))
            if not headline:
                headline = f"picked {name}, the only CPU backend usable here" + (
                    f" ({'; '.join(f'{k}: {v}' for k, v in why.items())})" if why else "")
        record = {"picked": name, "candidates": {k: round(v, 3) for k, v in ms.items()},
                  "rounds": rounds if ms else 0, "warmup": warmup if ms else 0, "batch": BATCH,
                  "calls_per_round": calls, "cpu": cpu_model(), "cpus": os.cpu_count(),
                  "unavailable": {**gpu_why, **why}}
        reseal(built[name], auto_pick=record)
        out = outs[name]
        _refuse_foreign_output(out)  # still ours: nothing replaced it during the builds
        _replace(built[name], out)
    except OSError as e:  # name the folder the user asked for, not a hidden temp one
        sub = next((c for c in cands if str(e.filename or "").startswith(str(tmp / c.engine_dir_name))), cands[0])
        raise name_intended(e, tmp / sub.engine_dir_name, outs[sub.name]) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the losers (and, after a failure, everything)
    say(f"build-engine: {headline}; pass --backend to choose")
    return name, out


def engine_feeds(manifest: dict, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Seeded inputs for every input the engine has, of its own shapes at ``batch``: sample and
    timestep drawn as ``saq-deploy bench`` draws them, class labels and any other input from the spec."""
    from saq_deploy.validate.bench import _feed

    meta = manifest["model_meta"]
    x, t, _ = _feed(meta["kind"], meta["sample_shape"], batch)
    g = torch.Generator().manual_seed(1)
    feeds = {}
    for spec in manifest["inputs"]:
        name = spec["name"]
        rest = [d if isinstance(d, int) else TEXT_LENGTH for d in spec["shape"][1:]]
        if name == "sample":
            feeds[name] = x
        elif name == "timestep":
            feeds[name] = t
        elif "int" in spec["dtype"]:
            feeds[name] = torch.arange(batch).remainder(meta.get("num_classes") or 1).reshape(batch, *rest)
        else:
            feeds[name] = torch.randn(batch, *rest, generator=g)
    return feeds


def time_engines(engines: dict[str, Path], *, rounds: int = ROUNDS, warmup: int = WARMUP,
                 batch: int = BATCH) -> tuple[dict[str, float], int]:
    """Median ms per engine call of each engine folder: warm-up calls, then ``rounds`` rounds, the
    order reversed every other round so drift hits all alike; returns (ms by name, calls per round)."""
    from saq_deploy.backends.engine import load_engine

    opened = {}
    try:
        for k, d in engines.items():
            opened[k] = load_engine(d)
        feeds = engine_feeds(next(iter(opened.values())).manifest, batch)
        shape = tuple(feeds["sample"].shape)
        slowest = 0.0
        with torch.no_grad():
            for e in opened.values():
                for _ in range(max(warmup, 1)):
                    t0 = time.perf_counter()
                    e.runner.run(feeds, shape)
                slowest = max(slowest, time.perf_counter() - t0)
            calls = max(1, min(MAX_CALLS_PER_ROUND, int(ROUND_S / max(slowest, 1e-6))))
            per: dict[str, list[float]] = {k: [] for k in opened}
            for r in range(rounds):
                for k in (list(opened) if r % 2 == 0 else list(reversed(opened))):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        opened[k].runner.run(feeds, shape)
                    per[k].append((time.perf_counter() - t0) / calls)
    finally:
        for e in opened.values():
            e.close()
    return {k: statistics.median(v) * 1000 for k, v in per.items()}, calls


def reseal(folder: Path, **fields) -> None:
    """Add ``fields`` to the engine manifest in ``folder`` (its seal checked first) and seal it again."""
    from saq_deploy.backends.engine import MANIFEST_FILE, read_engine_manifest
    from saq_deploy.utils.io import SEAL_KEY, seal_manifest, write_json_atomic

    m = read_engine_manifest(folder)
    m.pop(SEAL_KEY)
    write_json_atomic(folder / MANIFEST_FILE, seal_manifest({**m, **json.loads(json.dumps(fields))}))
