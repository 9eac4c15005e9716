"""Quality of `builtin:digits-text` (FP32 and calibrated artifacts of it) on balanced prompts.

Usage:
  python benchmarks/text_quality.py [--n 1000] [--seeds 0,1000] [--settings ddim:20,dpmpp-2m:10]
         [--cfg 3] [--artifact NAME=PATH ...] [--out docs/results/reference-text] [--cache DIR] [--append]
  python benchmarks/text_quality.py --merge part1.json part2.json --out docs/results/text-quality

Every row samples the same n prompts ("a thin zero" ... "a bold nine", balanced) from the same x_T
per seed. Figures: prompt accuracy (the digit classifier agrees with the digit named) and attribute
accuracy (the image's ink is on the side of its class median that the prompt names) with Wilson 95 %
intervals; digit-FID with a 95 % bootstrap interval over the samples; for artifacts, PSNR against the
FP samples of the same seed and prompt (paired), with a bootstrap interval. FP at a second seed set
is its own seed-to-seed spread. Writes <out>.json and <out>.md."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:digits-text"
sys.path.insert(0, str(ROOT / "benchmarks"))

from stats import fid_with_ci, paired_psnr, wilson


def sample(eps, loaded, table, index, sampler: str, steps: int, cfg: float, seed: int, n: int):
    from saq_deploy.generate import SampleSettings, generate

    p = int(index.max()) + 1
    s = SampleSettings(sampler=sampler, steps=steps, cfg=cfg, seed=seed, n=n, batch_size=250)
    images, _ = generate(eps, loaded.schedule(), loaded.sample_shape, s, cond=table[index],
                         null_label=table[p:p + 1])
    return images


def score(images, digits, attrs, thresholds, resamples: int, seed: int) -> dict:
    from saq_deploy.eval.features import DigitFeatures
    from saq_deploy.reference.text_data import attribute_of

    ext = DigitFeatures()
    feats = ext(images)
    pred = ext.probs(images).argmax(1)
    ok_digit = int((torch.as_tensor(pred) == digits).sum())
    ok_attr = int((attribute_of(images, digits, thresholds) == attrs).sum())
    n = len(images)
    fid, lo, hi = fid_with_ci(np.asarray(feats, dtype=np.float64), ext.name, resamples, seed)
    return {"n": n, "digit_fid": fid, "digit_fid_ci": [lo, hi],
            "prompt_accuracy": ok_digit / n, "prompt_accuracy_ci": list(wilson(ok_digit, n)),
            "attribute_accuracy": ok_attr / n, "attribute_accuracy_ci": list(wilson(ok_attr, n))}


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.models.loading import load_model
    from saq_deploy.models.text_encoder import TextEncoder, pipeline_root
    from saq_deploy.reference.text_data import eval_prompts
    from saq_deploy.utils.io import atomic_path, write_json_atomic
    from saq_deploy.utils.versions import package_versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1000")
    ap.add_argument("--settings", default="ddim:20,dpmpp-2m:10")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--artifact", action="append", default=[], help="NAME=PATH of a calibrated artifact")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/reference-text")
    ap.add_argument("--model", default=MODEL, help="the pipeline (a folder shaped like builtin:digits-text)")
    ap.add_argument("--append", action="store_true",
                    help="merge into <out>.json (a row of the same model/sampler/steps/seed is replaced)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for FP32 samples, so a later --append run pairs against them without re-sampling")
    ap.add_argument("--notes", type=Path, default=None, help="markdown appended below the table (findings)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="only merge these result JSONs (runs that went in parallel) into <out>, no sampling")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.notes)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    thresholds = loaded.meta["ink_thresholds"]
    prompts, index, digits, attrs = eval_prompts(args.n)
    table = TextEncoder(pipeline_root(args.model)).table(prompts, "", warn=False)
    models = [("FP32", loaded.eps_model())]
    from saq_deploy.calibrate.artifact import load_artifact

    for spec in args.artifact:
        name, path = spec.split("=", 1)
        models.append((name, load_artifact(path).eps_model()))
    rows = []
    for setting in args.settings.split(","):
        sampler, steps = setting.split(":")
        for seed in map(int, args.seeds.split(",")):
            fp_images = None
            for name, eps in models:
                if name != "FP32" and seed != int(args.seeds.split(",")[0]):
                    continue  # quantized rows at the first seed set; FP's second set is its spread
                t0 = time.perf_counter()
                cached = (args.cache / f"fp32_{sampler}{steps}_seed{seed}_n{args.n}_cfg{args.cfg:g}.pt"
                          if args.cache is not None and name == "FP32" else None)
                if cached is not None and cached.exists():  # wall_s then says nothing of sampling cost
                    images = torch.load(cached, weights_only=True)
                else:
                    images = sample(eps, loaded, table, index, sampler, int(steps), args.cfg, seed, args.n)
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(cached) as tmp:
                            torch.save(images, tmp)
                row = {"model": name, "sampler": sampler, "steps": int(steps), "seed": seed,
                       **score(images, digits, attrs, thresholds, args.resamples, seed)}
                if fp_images is None:
                    fp_images = images
                else:
                    row.update(paired_psnr(images, fp_images, args.resamples, seed))
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    meta = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads, "
                       f"load average at the end {' '.join(load)}",
            "versions": package_versions(), "cfg": args.cfg, "n": args.n, "prompts": prompts}
    if args.append and args.out.with_suffix(".json").exists():
        new = {_key(r) for r in rows}
        old = json.loads(args.out.with_suffix(".json").read_text())
        rows = [r for r in old["rows"] if _key(r) not in new] + rows
        meta["command"] = old["meta"]["command"] + "` then `" + meta["command"]
    write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(render(meta, rows))


def _key(r: dict) -> tuple:
    return r["model"], r["sampler"], r["steps"], r["seed"]


def _read_part(path: Path) -> dict:
    """A result JSON, or the stdout log of a run (one JSON row per line) that was stopped early:
    its rows are kept and its command is read from the first line of the log, if it is one."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    command = lines[0][2:] if lines and lines[0].startswith("$ ") else f"(rows from the log {path.name})"
    return {"meta": {"command": command, "machine": "see the log"}, "rows": rows}


def merge(parts: list[Path], out: Path, notes: Path | None = None) -> None:
    """Rows of several runs in one table; a later part's row replaces an earlier one of the same key."""
    from saq_deploy.utils.io import atomic_path, write_json_atomic

    docs = [_read_part(p) for p in parts]
    rows = {}
    for d in docs:
        rows.update({_key(r): r for r in d["rows"]})
    full = [d for d in docs if "versions" in d["meta"]]
    if not full:
        raise SystemExit("--merge needs at least one result JSON (logs carry no versions or settings)")
    meta = dict(full[-1]["meta"])
    meta["command"] = "` then `".join(d["meta"]["command"] for d in docs)
    meta["machine"] = "; ".join(dict.fromkeys(d["meta"]["machine"] for d in full))
    write_json_atomic(out.with_suffix(".json"), {"meta": meta, "rows": list(rows.values())})
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(render(meta, list(rows.values())) + ("\n" + notes.read_text() if notes else ""))


def render(meta: dict, rows: list[dict]) -> str:
    def ci(r, k, fmt):
        lo, hi = r[k + "_ci"]
        return f"{fmt.format(r[k])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    lines = [f"# builtin:digits-text: sample quality ({meta['n']} samples per row, CFG {meta['cfg']:g})", "",
             f"Command: `{meta['command']}`  ", (f"Machine: {meta['machine']}; torch {meta['versions']['torch']}, "
                                                f"diffusers {meta['versions']['diffusers']}"), "",
             ("Prompts: the 20 balanced prompts 'a thin zero' ... 'a bold nine' (sample i: digit i mod 10, "
             "stroke weight (i div 10) mod 2), negative prompt ''. Prompt accuracy: the digit classifier agrees "
             "with the digit named (target >= 95 %). Attribute accuracy: the image holds more ink than the "
             "median training image of its digit iff the prompt says 'bold' (chance 50 %). digit-FID against "
             "all 1,797 real digits in the classifier's feature space. Brackets: 95 % intervals (Wilson for "
             "accuracies, FID: estimate +- 1.96 bootstrap standard errors over the samples; paired PSNR: percentile bootstrap). Quantized rows share the FP row's "
             "seeds and prompts; PSNR is per sample against FP, then averaged."), "",
             "| model | sampler | steps | seed | prompt accuracy | attribute accuracy | digit-FID | PSNR vs FP (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    def order(r):  # FP first, then 8-bit weights before 4-bit, then the method name
        group = 0 if r["model"] == "FP32" else 1 if r["model"].startswith("W8") else 2
        return r["sampler"], r["steps"], group, r["model"], r["seed"]

    for r in sorted(rows, key=order):
        psnr = ci(r, "psnr_vs_fp", "{:.2f}") if "psnr_vs_fp" in r else "-"
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['seed']} | "
                     f"{ci(r, 'prompt_accuracy', '{:.3f}')} | {ci(r, 'attribute_accuracy', '{:.3f}')} | "
                     f"{ci(r, 'digit_fid', '{:.2f}')} | {psnr} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
