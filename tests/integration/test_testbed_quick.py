"""`benchmarks/testbed.py --quick`, the CI smoke of the testbed protocol: it calibrates, samples,
pairs and renders, and the figures it writes obey identities that hold whatever the numbers are."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_run_writes_a_consistent_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    testbed = importlib.import_module("testbed")
    testbed.main(["--quick", "--clip", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "tb")])
    data = json.loads((tmp_path / "tb.json").read_text())
    rows = data["rows"]
    fp = {(r["sampler"], r["grid"], r["seed"]): r for r in rows if r["model"] == "fp32"}
    seeds = data["meta"]["seeds"]
    assert len(seeds) == 2 and all(("dpm-solver-2", "logsnr5 (testbed)", s) in fp for s in seeds)
    q = [r for r in rows if r["model"] == "minmax" and r.get("kind") != "pair"]
    assert len(q) == 1 and [r["model"] for r in rows].count("minmax + clip_sample") == 1
    row = q[0]
    assert row["n"] == 64 and row["digit_fid_ci"][0] < row["digit_fid"] < row["digit_fid_ci"][1]
    # paired differences against the two FP references are consistent with the FP rows themselves
    ddim, dpm2 = fp[("ddim", "logsnr5 (testbed)", seeds[0])], fp[("dpm-solver-2", "logsnr5 (testbed)", seeds[0])]
    assert row["fid_minus_fp_ddim"] == pytest.approx(row["digit_fid"] - ddim["digit_fid"], abs=1e-6)
    assert row["fid_minus_fp_dpm2"] == pytest.approx(row["digit_fid"] - dpm2["digit_fid"], abs=1e-6)
    # the DDIM default grid on logsnr is the testbed grid up to its convention: nearly the same samples
    same = fp[("ddim", "logsnr5 (ddim default)", seeds[0])]
    assert same["psnr_vs_fp_ddim"] > 35
    # the paired comparison re-reads both methods' samples: its FID difference is the two rows' own
    mse = next(r for r in rows if r["model"] == "mse" and r.get("kind") != "pair")
    pair = next(r for r in rows if r.get("kind") == "pair")
    assert pair["model"] == "mse vs minmax"
    assert pair["fid_delta"] == pytest.approx(mse["digit_fid"] - row["digit_fid"], abs=1e-6)
    assert pair["fid_delta_ci"][0] <= pair["fid_delta"] <= pair["fid_delta_ci"][1] and pair["mse_between"] > 0
    # with --clip, the pair is also compared on the clipped rows (a separate sampler setting)
    clipped = {r["model"]: r for r in rows if r["model"].endswith(" + clip_sample")}
    pair_clip = next(r for r in rows if r.get("kind") == "pair" and r["grid"].endswith("+ clip_sample"))
    assert pair_clip["fid_delta"] == pytest.approx(
        clipped["mse + clip_sample"]["digit_fid"] - clipped["minmax + clip_sample"]["digit_fid"], abs=1e-6)
    md = (tmp_path / "tb.md").read_text()
    assert "| minmax |" in md and "(a) FID ≤ FP DDIM" in md
