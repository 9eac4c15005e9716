"""`calibrate --method auto` / `--compare m1,m2,...`: calibrate several methods on the user's own
model and keep the one whose samples come closest to the full-precision model's.

Which method wins depends on the model, the bit width and the step count (docs/results/quality.md),
so the tool measures it instead of guessing. The criterion needs no feature network (a user's model
may draw anything): every candidate samples the same seeds with the deployment sampler, and its
final samples are compared, per sample, with

- ``fp``: the FP model's samples at the same sampler, steps and seeds (how faithful the engine is);
- ``fp-higher-order``: the FP model's DPM-Solver-2 samples at the same step count (MOTA's target:
  a quantized first-order sampler that lands nearer the second-order trajectory is better than
  one that only copies FP's first-order error).

Both are reported; ``criterion`` picks the ranking. Means carry bootstrap 95 % intervals and the
winner's lead over the runner-up is a paired interval at the same seeds, so a tie is called a tie.

Candidates run cheapest first; ``budget_s`` stops starting new ones once one has finished
(reported as skipped). They
are built in ``.<out>.compare/`` beside the output, share one copy of the trajectory data where
their data settings agree (hard links), survive a kill (a finished candidate is reused) and the
winner is renamed onto ``out`` with ``comparison/`` (report, JSON, plot) inside it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saq_deploy.calibrate.methods import CRITERIA, auto_candidates, get_method
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.errors import ConfigError

HIGHER_ORDER = "dpm-solver-2"
COMPARISON_DIR = "comparison"


@dataclass(frozen=True)
class CompareSettings:
    methods: tuple[str, ...] = ()  # () = the auto candidates for the recipe's bits
    criterion: str = "fp"
    eval_sampler: str = "ddim"  # the deployment sampler: first order, as the paper deploys
    eval_steps: int | None = None  # None: the recipe's calibration steps
    eval_n: int = 64
    eval_seed: int = 1000  # not the calibration seed: scored on samples it was not trained on
    budget_s: float | None = None
    keep_candidates: bool = False

    def resolved(self, recipe: Recipe) -> CompareSettings:
        import dataclasses

        if self.criterion not in CRITERIA:
            raise ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not isinstance(self.eval_n, int) or self.eval_n < 2:
            raise ConfigError(f"--eval-n must be an integer >= 2 (intervals need two samples), got {self.eval_n}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"--budget must be > 0 minutes, got {self.budget_s / 60:g}")
        methods = self.methods or auto_candidates(recipe.quant.bits)
        for m in methods:
            get_method(m).check(recipe.quant.bits)
        if len(set(methods)) < 2:
            raise ConfigError(f"a comparison needs at least two different methods, got {', '.join(methods)}")
        return dataclasses.replace(self, methods=tuple(dict.fromkeys(methods)),
                                   eval_steps=self.eval_steps or recipe.calibration.steps)


def candidate_recipe(recipe: Recipe, method: str) -> Recipe:
    """The recipe with ``method``; a MOTA reconstruction needs a higher-order data sampler."""
    over: dict = {"calibration.method": method}
    m = get_method(method)
    if m.mota and m.reconstructs and recipe.calibration.sampler == "ddim":
        over["calibration.sampler"] = HIGHER_ORDER
    return recipe.with_overrides(over)


def _data_key(recipe: Recipe) -> str:
    """Candidates whose data settings agree share one trajectory collection."""
    from saq_deploy.calibrate.steps import data_pairing

    c = recipe.calibration
    key = {"model": recipe.model.spec, "sampler": c.sampler, "steps": c.steps, "spacing": c.spacing,
           "n": c.num_samples, "cfg": c.cfg, "seed": c.seed, "pairing": data_pairing(recipe)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _finished(cand_out: Path, recipe: Recipe) -> bool:
    """A candidate a killed comparison already finished, with this exact recipe."""
    from saq_deploy.calibrate.artifact import RECIPE_FILE, verify_artifact
    from saq_deploy.errors import ModelLoadError

    if not cand_out.exists():
        return False
    try:
        verify_artifact(cand_out)
        if json.loads((cand_out / RECIPE_FILE).read_text()) == json.loads(json.dumps(recipe.to_dict())):
            return True
    except (ModelLoadError, OSError, ValueError):  # partial or damaged: calibrate it again
        pass
    shutil.rmtree(cand_out, ignore_errors=True)
    return False


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def bootstrap_ci(values, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (paired differences: pass the differences)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compare_methods(recipe: Recipe, out: str | Path, settings: CompareSettings, *, progress: bool = False,
                    note: Callable[[str], None] = _stderr) -> dict:
    """Calibrate every candidate, score it, keep the winner at ``out``; returns the comparison."""
    from saq_deploy.calibrate.prompts import bind_prompts, load_prompt_table
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.calibrate.steps import collect_or_open
    from saq_deploy.models.loading import load_model

    out = Path(out)
    if out.exists():
        raise ConfigError(f"output '{out}' already exists; pass another -o or delete it")
    s = settings.resolved(recipe)
    work = out.parent / f".{out.name}.compare"
    # a text UNet: prompt indices as its cond, scored on the recipe's prompts (calibrate.prompts)
    loaded = bind_prompts(load_model(recipe.model.spec), load_prompt_table(recipe))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    refs = _fp_references(loaded, recipe, s)
    rows: list[dict] = []
    for i, name in enumerate(s.methods, 1):
        elapsed = time.perf_counter() - t0
        if s.budget_s is not None and elapsed > s.budget_s and any("skipped" not in r for r in rows):
            note(f"compare: [{i}/{len(s.methods)}] {name}: skipped, the {s.budget_s / 60:g}-minute budget is spent")
            rows.append({"method": name, "skipped": f"budget spent after {elapsed / 60:.1f} min"})
            continue
        r = candidate_recipe(recipe, name)
        cand = work / name
        started = time.perf_counter()
        if _finished(cand, r):
            note(f"compare: [{i}/{len(s.methods)}] {name}: reusing the candidate a killed run finished")
        else:
            note(f"compare: [{i}/{len(s.methods)}] {name}: calibrating")
            shared = work / f"data-{_data_key(r)}"
            collect_or_open(loaded, r, shared, progress=progress)  # once per data setting
            part = work / f".{name}.partial"
            if not (part / "data").exists():
                shutil.copytree(shared, part / "data", copy_function=os.link)
            calibrate(r, cand, progress=progress)
        row = _score(cand, refs, s, loaded)
        row.update(method=name, calibrate_s=round(time.perf_counter() - started, 1))
        rows.append(row)
        note(f"compare: [{i}/{len(s.methods)}] {name}: distance to FP {row['fp']['mean']:.3g}, "
             f"to FP {HIGHER_ORDER} {row['fp-higher-order']['mean']:.3g}")
    result = _rank(rows, refs, recipe, s)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    winner = work / result["winner"]
    from saq_deploy.calibrate.compare_report import write_comparison

    write_comparison(winner / COMPARISON_DIR, result)
    from saq_deploy.utils.io import fsync_dir, fsync_tree

    fsync_tree(winner)
    os.replace(winner, out)
    fsync_dir(out.parent)
    if s.keep_candidates:
        kept = out.parent / f"{out.name}-candidates"
        shutil.rmtree(kept, ignore_errors=True)
        for d in work.glob("data-*"):
            shutil.rmtree(d, ignore_errors=True)
        os.replace(work, kept)
        result["candidates_kept_in"] = str(kept)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _eval_settings(recipe: Recipe, s: CompareSettings, sampler: str):
    from saq_deploy.generate import SampleSettings

    return SampleSettings(sampler=sampler, steps=s.eval_steps, cfg=recipe.calibration.cfg, seed=s.eval_seed,
                          n=s.eval_n, spacing=recipe.calibration.spacing)


def _sample(eps_model, loaded, settings) -> torch.Tensor:
    from saq_deploy.generate import generate

    with torch.no_grad():
        images, _ = generate(eps_model, loaded.schedule(), loaded.sample_shape, settings,
                             num_classes=loaded.num_classes, null_label=loaded.null_label)
    return images


def _fp_references(loaded, recipe: Recipe, s: CompareSettings) -> dict:
    fp = _sample(loaded.eps_model(), loaded, _eval_settings(recipe, s, s.eval_sampler))
    ho = _sample(loaded.eps_model(), loaded, _eval_settings(recipe, s, HIGHER_ORDER))
    d = per_sample_mse(fp, ho)
    return {"fp": fp, "fp-higher-order": ho, "fp_first_to_higher": _stats(d)}


def _stats(d: torch.Tensor) -> dict:
    lo, hi = bootstrap_ci(d.numpy())
    return {"mean": float(d.mean()), "ci95": [lo, hi], "per_sample": [float(v) for v in d]}


def _score(cand: Path, refs: dict, s: CompareSettings, loaded) -> dict:
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.models.eps_model import IndexedCondEpsModel

    cm = load_artifact(cand)
    recipe = Recipe.from_dict(json.loads((cand / "recipe.json").read_text()))
    eps = cm.eps_model() if loaded.cond_table is None else IndexedCondEpsModel(cm.eps_model(), loaded.cond_table)
    q = _sample(eps, loaded, _eval_settings(recipe, s, s.eval_sampler))  # ``loaded``: the same conditioning
    return {"state_sha256": cm.manifest["state_sha256"],
            **{c: _stats(per_sample_mse(q, refs[c])) for c in CRITERIA}}


def _rank(rows: list[dict], refs: dict, recipe: Recipe, s: CompareSettings) -> dict:
    import numpy as np

    scored = sorted((r for r in rows if "skipped" not in r), key=lambda r: r[s.criterion]["mean"])
    if not scored:
        raise ConfigError("no candidate finished within the budget; raise --budget")
    win = scored[0]
    lead = None
    if len(scored) > 1:
        diff = np.asarray(scored[1][s.criterion]["per_sample"]) - np.asarray(win[s.criterion]["per_sample"])
        lo, hi = bootstrap_ci(diff)
        lead = {"runner_up": scored[1]["method"], "mean": float(diff.mean()), "ci95": [lo, hi],
                "relative": float(diff.mean() / scored[1][s.criterion]["mean"]) if scored[1][s.criterion]["mean"]
                else 0.0, "decided": lo > 0}
    return {"winner": win["method"], "criterion": s.criterion, "lead": lead, "rows": rows,
            "fp_first_to_higher": refs["fp_first_to_higher"], "bits": recipe.quant.bits,
            "model": recipe.model.spec, "eval": {"sampler": s.eval_sampler, "steps": s.eval_steps,
                                                 "spacing": recipe.calibration.spacing, "cfg": recipe.calibration.cfg,
                                                 "n": s.eval_n, "seed": s.eval_seed, "higher_order": HIGHER_ORDER},
            "budget_s": s.budget_s, "methods": list(s.methods)}
