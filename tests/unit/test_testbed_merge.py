"""benchmarks/testbed_report.merge: FP rows from the first part that has them, quantized rows only
at the table's own bits (a W8A8 table that borrows a W4A8 part's FP rows must not list its W4A8 rows)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _part(path: Path, bits: str, rows: list[dict], seeds=(1000,)) -> Path:
    meta = {"command": f"python benchmarks/testbed.py --bits {bits}", "machine": "test", "n": 4, "steps": 5,
            "spacing": "logsnr", "bits": bits, "cfg": 1.5, "seeds": list(seeds), "grid": [999.0, 0.0]}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _row(model: str, **extra) -> dict:
    return {"model": model, "sampler": "ddim" if model != "dpm2" else "dpm-solver-2", "grid": "logsnr5 (testbed)",
            "seed": 1000, "digit_fid": 1.0, "digit_fid_ci": [0.5, 1.5], "accuracy": 1.0, "accuracy_ci": [1.0, 1.0],
            **extra}


def test_merge_keeps_fp_rows_once_and_only_rows_at_the_tables_bits(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    report = importlib.import_module("testbed_report")
    w8 = _part(tmp_path / "w8.json", "w8a8 full-INT8 (attention matmuls quantized)",
               [_row("minmax", bits="w8a8 full-INT8"),
                {"model": "a vs b", "kind": "pair", "sampler": "ddim", "grid": "logsnr5 (testbed)", "seed": 1000,
                 "fid_delta": -1.0, "fid_delta_ci": [-2.0, -0.5], "mse_between": 0.1}])
    w4 = _part(tmp_path / "w4.json", "w4a8", [_row("fp32"), _row("sa-qlora", bits="w4a8"), _row("brecq")],
               seeds=(1000, 5000))
    w8b = _part(tmp_path / "w8b.json", "w8a8 full-INT8 (attention matmuls quantized)",
                [_row("fp32"), _row("sa-qlora", bits="w8a8 full-INT8")])
    report.merge([w8, w4, w8b], tmp_path / "out")
    merged = json.loads((tmp_path / "out.json").read_text())
    rows = merged["rows"]
    assert merged["meta"]["seeds"] == [1000, 5000]  # the FP part's seed sets, for FP's own spread
    assert merged["meta"]["bits"].startswith("w8a8")  # the first part's table
    models = [r["model"] for r in rows]
    assert models.count("fp32") == 1  # from w4, the first part with FP rows; w8b's copy is left out
    assert "brecq" not in models  # w4's row without its own bits field takes its part's bits
    assert sorted(m for m in models if m != "fp32") == ["a vs b", "minmax", "sa-qlora"]
    assert next(r for r in rows if r["model"] == "sa-qlora")["bits"] == "w8a8 full-INT8"
    md = (tmp_path / "out.md").read_text()
    assert "| a vs b |" in md and "w8a8 full-INT8" in md.splitlines()[0]
