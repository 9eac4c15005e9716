"""One rank (or the one process) of tests/integration/test_distributed.py: every sharded path in one
launch, since each process start costs seconds. Run as ``python distributed_child.py OUT`` for the
single-process reference, or under ``torchrun --nproc-per-node 2`` for the sharded run.

``KILL_AT_EPOCH`` (env): rank 1 SIGKILLs itself when QLoRA epoch N starts, to check that the other
rank fails with one line and the epoch-N checkpoint stays usable; only the QLoRA part runs then."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.helpers import digits_recipe  # PYTHONPATH is the repo root (test_distributed.py)

MINMAX = digits_recipe("w8a8", "minmax", num_samples=40, steps=3)
QLORA = digits_recipe("w4a8", "sa-qlora", num_samples=4, steps=3,
                      qlora={"rank": 4, "epochs": 3, "mixstep": [1], "batch_size": 4})


def cli(*args: str) -> None:
    from saq_deploy.cli.app import main

    try:
        main(list(args))
    except SystemExit as e:
        if e.code:
            raise


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "minmax.toml").write_text(MINMAX)
    (out / "qlora.toml").write_text(QLORA)
    kill_at = os.environ.get("KILL_AT_EPOCH")
    if kill_at is not None:
        from saq_deploy.calibrate import qlora

        real = qlora.epoch_batch

        def epoch_batch(seed, epoch, *a, **k):
            if epoch == int(kill_at) and os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(seed, epoch, *a, **k)

        qlora.epoch_batch = epoch_batch
        cli("calibrate", "-c", str(out / "qlora.toml"), "-o", str(out / "qlora"))
        return
    cli("calibrate", "-c", str(out / "minmax.toml"), "-o", str(out / "minmax"))
    from saq_deploy.calibrate.trajectory import collect_trajectories
    from saq_deploy.models.loading import load_model

    m = load_model("builtin:digits")
    # 10 samples in batches of 3 over 2 ranks, shards of 7 records: shard 2 is split between the ranks
    collect_trajectories(m.eps_model(), m.schedule(), out / "data", num_samples=10, steps=3, seed=5,
                         num_classes=m.num_classes, null_label=m.null_label, sample_shape=m.sample_shape,
                         batch_size=3, shard_size=7, model_hash=m.source_hash)
    cli("evaluate", "-n", "40", "--batch-size", "10", "--steps", "3", "-o", str(out / "eval.json"))
    cli("calibrate", "-c", str(out / "qlora.toml"), "-o", str(out / "qlora"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
