"""Train the digits metric classifier and write the committed metric artifacts.

    python -m saq_deploy.eval.train_classifier [OUT_DIR] [--seed N]

writes (atomically) to OUT_DIR (default: saq_deploy/reference/weights):
  digits_classifier.safetensors  weights + metadata (held-out accuracy, seed, epochs, data split)
  digits_classifier.json         the training report
  digits_fid_stats.npz           FID statistics of all 1,797 real digits in the classifier's feature
                                 space, plus the real features and labels for precision/recall"""

from __future__ import annotations

import json
from pathlib import Path

from saq_deploy.reference import DIGITS_CLASSIFIER_PATH, DIGITS_FID_STATS_PATH, WEIGHTS_DIR


def train_and_save(out_dir: str | Path = WEIGHTS_DIR, seed: int = 0, *, epochs: int | None = None,
                   progress: bool = False) -> dict:
    """Train the classifier, save weights, report and real-digit FID stats to ``out_dir``; return the report.

    ``progress``: report the stages (a bar on a terminal, log lines otherwise)."""
    from saq_deploy.eval.classifier import ClassifierTrainConfig, train_classifier
    from saq_deploy.utils.progress import progress as progress_for

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_epochs = ClassifierTrainConfig().epochs if epochs is None else epochs
    # one step per epoch plus the FID statistics: a log says which epoch runs and at what loss
    with progress_for(progress, "train-classifier") as bar:
        task = bar.task(f"train epoch 0/{n_epochs}", total=n_epochs + 1)

        def on_epoch(epoch: int, loss: float) -> None:
            task.update(completed=epoch, description=f"train epoch {epoch}/{n_epochs} loss {loss:.4f}")

        model, report = train_classifier(seed, epochs=epochs, on_epoch=on_epoch)
        task.advance(1, description="FID statistics and write")
        report = _stats_and_save(model, report, out)
        task.advance(1)
    return report


def _stats_and_save(model, report: dict, out: Path) -> dict:
    from saq_deploy.eval.classifier import save_classifier
    from saq_deploy.eval.features import DigitFeatures
    from saq_deploy.eval.fid import compute_stats, frechet_distance
    from saq_deploy.reference.data import load_digits_16
    from saq_deploy.utils.io import write_bytes_atomic

    extractor = DigitFeatures(model)
    images, labels = load_digits_16(split="all")
    feats = extractor(images)
    stats = compute_stats(feats, extractor.name, keep_features=True, labels=labels.numpy())
    report["feature_name"] = extractor.name
    report["fid_stats"] = {
        "n": stats.n,
        "dim": stats.dim,
        "data": "load_digits_16(split='all'): all 1797 images",
        "self_fid": frechet_distance(compute_stats(feats, extractor.name), stats),
    }

    weights_path = out / DIGITS_CLASSIFIER_PATH.name
    stats_path = out / DIGITS_FID_STATS_PATH.name
    meta = {
        "heldout_accuracy": report["heldout_accuracy"],
        "seed": report["seed"],
        "epochs": report["epochs"],
        "data_split": report["data_split"],
        "torch": report["torch"],
    }
    save_classifier(model, weights_path, meta)
    stats.save(stats_path)
    report["artifacts"] = {p.name: p.stat().st_size for p in (weights_path, stats_path)}
    write_bytes_atomic(out / DIGITS_CLASSIFIER_PATH.with_suffix(".json").name, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(WEIGHTS_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    result = train_and_save(args.out_dir, args.seed, epochs=args.epochs, progress=True)
    print(json.dumps(result, indent=2))
