"""Dual-order trajectory collection and the on-disk data set (saq_deploy.calibrate).

The model is analytic (no network), so every target is recomputed independently from the paper's
formulas: DPM-Solver-2's lambda midpoint and intermediate point, CFG by hand, a hand-run PLMS.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saq_deploy.calibrate import TrajectoryDataset, collect_trajectories
from saq_deploy.errors import ConfigError, SaqError
from saq_deploy.schedules import VPSchedule
from tests.helpers import linear_schedule

SHAPE = (1, 2, 2)
NULL = 3


def _schedule() -> VPSchedule:
    return linear_schedule()


class Toy:
    """eps(x, t, c) = 0.5 sigma(t) x + 0.1 t/1000 + 0.05 (c + 1) tanh(x): analytic, label-dependent."""

    def __init__(self, schedule: VPSchedule, nan_below: float | None = None) -> None:
        self.schedule = schedule
        self.nan_below = nan_below

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        view = (-1,) + (1,) * (x.ndim - 1)
        sig = self.schedule.sigma(t.double()).to(x.dtype).view(view)
        out = 0.5 * sig * x + 0.1 * (t.to(x.dtype) / 1000).view(view)
        if cond is not None:
            out = out + 0.05 * (cond.to(x.dtype) + 1).view(view) * torch.tanh(x)
        if self.nan_below is not None and float(t.min()) < self.nan_below:
            out = out * float("nan")
        return out


def _eval(model: Toy, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    return model(x, t.float(), cond)  # the sampler hands float32 timesteps to a float32 model


def _collect(tmp_path: Path, name: str = "traj", **kw):
    sched = _schedule()
    args = {"num_samples": 4, "steps": 4, "seed": 7, "cfg": 1.0, "num_classes": None, "null_label": None,
            "sample_shape": SHAPE, "batch_size": 3, "shard_size": 256}
    args.update(kw)
    model = args.pop("model", None) or Toy(sched)
    return collect_trajectories(model, sched, tmp_path / name, **args), sched, model


def _by_sample_step(d: dict[str, torch.Tensor]) -> dict[tuple[int, int], int]:
    return {(int(s), int(i)): r for r, (s, i) in enumerate(zip(d["sample"], d["step"]))}


ALL = ("x_outer", "t_outer", "x_inter", "t_inter", "label", "eps_outer", "eps_inter", "step", "sample")


def test_dpm_solver_2_records_match_independent_recompute(tmp_path):
    ds, sched, model = _collect(tmp_path)
    assert len(ds) == 16 and ds.manifest["sampler"] == "dpm-solver-2"
    d = ds.load_fields(ALL)
    rows = _by_sample_step(d)
    grid = ds.manifest["grid"]
    assert len(grid) == 5 and grid[-1] == 0.0
    for (s, i), r in rows.items():
        t_prev, t_next = grid[i], grid[i + 1]
        x = d["x_outer"][r : r + 1]
        assert float(d["t_outer"][r]) == pytest.approx(t_prev, abs=1e-12)
        eps = _eval(model, x, d["t_outer"][r : r + 1])
        torch.testing.assert_close(d["eps_outer"][r : r + 1], eps)
        lam_prev, lam_next = float(sched.lam(t_prev)), float(sched.lam(t_next))
        s_i = float(sched.t_from_lam((lam_prev + lam_next) / 2))  # lambda midpoint
        assert float(d["t_inter"][r]) == pytest.approx(s_i, abs=1e-9)
        h = lam_next - lam_prev
        a_s, sig_s = float(sched.alpha(s_i)), float(sched.sigma(s_i))
        u = a_s / float(sched.alpha(t_prev)) * x.double() - sig_s * math.expm1(h / 2) * eps.double()
        torch.testing.assert_close(d["x_inter"][r : r + 1].double(), u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d["eps_inter"][r : r + 1], _eval(model, d["x_inter"][r : r + 1],
                                                                    d["t_inter"][r : r + 1]))
        if (s, i + 1) in rows:  # teacher forcing along the FP second-order trajectory
            x_next = (float(sched.alpha(t_next)) / float(sched.alpha(t_prev)) * x.double()
                      - float(sched.sigma(t_next)) * math.expm1(h) * d["eps_inter"][r : r + 1].double())
            torch.testing.assert_close(d["x_outer"][rows[(s, i + 1)]].double(), x_next[0], atol=1e-5, rtol=1e-5)
    assert d["step"].tolist().count(0) == 4 and set(d["label"].tolist()) == {-1}
    assert not ds.conditional


def test_cfg_target_is_the_combined_eps(tmp_path):
    w = 2.5
    ds, _, model = _collect(tmp_path, num_classes=3, null_label=NULL, cfg=w, steps=3)
    d = ds.load_fields(ALL)
    assert d["label"].tolist()[:4] == [0, 1, 2, 0] and ds.manifest["guided"]
    for r in range(len(ds)):
        x, t, c = d["x_inter"][r : r + 1], d["t_inter"][r : r + 1], d["label"][r : r + 1]
        e_u = _eval(model, x, t, torch.full_like(c, NULL))
        e_c = _eval(model, x, t, c)
        torch.testing.assert_close(d["eps_inter"][r : r + 1], e_u + w * (e_c - e_u), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(e_c, e_u)
    with pytest.raises(ConfigError, match="null label"):
        _collect(tmp_path, name="nonull", num_classes=3, null_label=None, cfg=w)


def test_reverse_pairing_swaps_student_and_target(tmp_path):
    fwd, _, _ = _collect(tmp_path, name="fwd")
    rev, _, _ = _collect(tmp_path, name="rev", pairing="intermediate_to_outer")
    assert tuple(fwd.student_fields()) == ("x_outer", "t_outer", "label")
    assert tuple(fwd.target_fields()) == ("x_inter", "t_inter", "label", "eps_inter")
    assert tuple(rev.student_fields()) == ("x_inter", "t_inter", "label")
    assert tuple(rev.target_fields()) == ("x_outer", "t_outer", "label", "eps_outer")
    assert rev.target_fields().eps == "eps_outer" and rev.manifest["pairing"] == "intermediate_to_outer"
    a, b = fwd.load_fields(ALL), rev.load_fields(ALL)
    for name in ALL:  # same sampling, only the roles differ
        torch.testing.assert_close(a[name], b[name])
    sf, tf = fwd.student_fields(), fwd.target_fields()
    rs, rt = rev.student_fields(), rev.target_fields()
    for x, y in ((sf.x, rt.x), (sf.t, rt.t), (tf.x, rs.x), (tf.t, rs.t)):
        torch.testing.assert_close(a[x], b[y])
    batch = next(rev.iter_batches(4, fields=rev.student_fields() + rev.target_fields()))
    assert set(batch) == {"x_inter", "t_inter", "label", "x_outer", "t_outer", "eps_outer"}


def test_plms_target_is_the_combined_direction(tmp_path):
    steps = 6  # warm-up, AB2, AB3, AB4, AB4, AB4
    ds, sched, model = _collect(tmp_path, sampler="plms", steps=steps, num_samples=2, batch_size=2)
    d = ds.load_fields(ALL)
    grid = ds.manifest["grid"]
    torch.testing.assert_close(d["x_inter"], d["x_outer"])
    torch.testing.assert_close(d["t_inter"], d["t_outer"])

    def ddim(x, e, t_from, t_to):
        a_s, s_s, a_t, s_t = (float(f(t)) for f, t in ((sched.alpha, t_from), (sched.sigma, t_from),
                                                        (sched.alpha, t_to), (sched.sigma, t_to)))
        return a_t / a_s * x - (a_t * s_s / a_s - s_t) * e

    rows = _by_sample_step(d)
    for s in range(2):  # hand-run PLMS from the recorded x_T
        x = d["x_outer"][rows[(s, 0)]][None]
        hist: list[torch.Tensor] = []
        for i in range(steps):
            t = torch.tensor([grid[i]])
            e = _eval(model, x, t)
            hist.append(e)
            if i == 0:
                e_pred = _eval(model, ddim(x, e, grid[0], grid[1]), torch.tensor([grid[1]]))
                direction = (e + e_pred) / 2
            elif len(hist) == 2:
                direction = (3 * hist[-1] - hist[-2]) / 2
            elif len(hist) == 3:
                direction = (23 * hist[-1] - 16 * hist[-2] + 5 * hist[-3]) / 12
            else:
                direction = (55 * hist[-1] - 59 * hist[-2] + 37 * hist[-3] - 9 * hist[-4]) / 24
            r = rows[(s, i)]
            torch.testing.assert_close(d["x_outer"][r], x[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(d["eps_outer"][r], e[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(d["eps_inter"][r], direction[0], atol=1e-4, rtol=1e-4)
            x = ddim(x, direction, grid[i], grid[i + 1])
    assert ds.manifest["target_kind"] == "fp_plms_direction"


def test_plms_leading_zero_length_last_step(tmp_path):
    """'leading' (the SD-1.5 template's spacing) ends PLMS's grid 0 -> terminal 0: a step that does
    not move the sample; it is recorded with the FP eps as its direction instead of failing."""
    ds, _, _ = _collect(tmp_path, sampler="plms", steps=4, num_samples=2, batch_size=2, spacing="leading")
    grid = ds.manifest["grid"]
    assert grid[-2:] == [0.0, 0.0]
    d = ds.load_fields(ALL)
    last = d["step"] == len(grid) - 2
    assert int(last.sum()) == 2
    torch.testing.assert_close(d["eps_inter"][last], d["eps_outer"][last])
    assert torch.isfinite(d["eps_inter"]).all()


def test_ddim_is_same_point_data(tmp_path):
    ds, _, model = _collect(tmp_path, sampler="ddim")
    d = ds.load_fields(ALL)
    torch.testing.assert_close(d["eps_inter"], d["eps_outer"])
    torch.testing.assert_close(d["x_inter"], d["x_outer"])
    torch.testing.assert_close(d["eps_outer"], _eval(model, d["x_outer"], d["t_outer"]))
    dpm, _, _ = _collect(tmp_path, name="dpm")
    assert ds.manifest["grid"] == dpm.manifest["grid"]  # same outer grid and x_T as the MOTA data
    first = d["step"] == 0
    torch.testing.assert_close(d["x_outer"][first], dpm.load_fields(["x_outer", "step"])["x_outer"][first])


def test_shards_batches_and_manifest(tmp_path):
    ds, _, _ = _collect(tmp_path, num_samples=5, steps=3, shard_size=4, model_hash="abc")
    files = sorted(p.name for p in ds.path.glob("shard_*.safetensors"))
    assert files == [f"shard_{k:05d}.safetensors" for k in range(4)]
    counts = [load_file(ds.path / f)["step"].shape[0] for f in files]
    assert counts == [4, 4, 4, 3] and max(counts) <= 4 and len(ds) == 15
    m = json.loads((ds.path / "manifest.json").read_text())
    for key in ("sampler", "pairing", "steps", "spacing", "grid", "seed", "num_samples", "cfg", "null_label",
                "model_hash", "sample_shape", "shards", "versions"):
        assert key in m, key
    assert m["model_hash"] == "abc" and m["sample_shape"] == list(SHAPE) and m["spacing"] == "quadratic"
    assert [s["records"] for s in m["shards"]] == counts and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["versions"]["torch"] and m["target_kind"] == "fp_intermediate"

    def keys(batches):
        return [(int(s), int(i)) for b in batches for s, i in zip(b["sample"], b["step"])]

    plain = list(ds.iter_batches(2, fields=("sample", "step", "x_outer")))
    assert [len(b["sample"]) for b in plain] == [2] * 7 + [1]
    assert sorted(keys(plain)) == sorted({(s, i) for s in range(5) for i in range(3)})
    whole = ds.load_fields(["sample", "step"])
    assert keys(plain) == keys([whole])
    a, b = (list(ds.iter_batches(4, fields=("sample", "step"), shuffle_seed=3)) for _ in range(2))
    assert keys(a) == keys(b) and sorted(keys(a)) == sorted(keys(plain)) and keys(a) != keys(plain)
    assert keys(list(ds.iter_batches(4, fields=("sample", "step"), shuffle_seed=4))) != keys(a)
    sub = ds.load_fields(["sample", "step"], indices=[14, 0, 5])
    assert keys([sub]) == [keys([whole])[k] for k in (14, 0, 5)]
    ds.verify()
    with pytest.raises(ConfigError, match="unknown trajectory field"):
        next(ds.iter_batches(2, fields=("nope",)))


def test_verify_catches_a_tampered_shard(tmp_path):
    ds, _, _ = _collect(tmp_path, shard_size=5)
    shard = ds.path / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(SaqError, match="shard shard_00001.safetensors does not match its manifest hash"):
        ds.verify()


def test_nan_in_a_shard_is_refused_on_load(tmp_path):
    ds, _, _ = _collect(tmp_path, shard_size=5)
    shard = ds.path / "shard_00000.safetensors"
    data = load_file(shard)
    data["eps_inter"][0] = float("nan")
    save_file(data, str(shard))
    with pytest.raises(SaqError, match="NaN"):
        list(ds.iter_batches(4, fields=("eps_inter",)))


def test_nan_from_the_model_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    sched = _schedule()
    with pytest.raises(SaqError, match="eps_outer at step 3"):
        collect_trajectories(Toy(sched, nan_below=300), sched, out / "traj", num_samples=3, steps=4, cfg=1.0,
                             num_classes=None, null_label=None, sample_shape=SHAPE, spacing="linspace")
    assert list(out.iterdir()) == []


def test_bad_options_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="unknown trajectory sampler"):
        _collect(tmp_path, sampler="euler")
    with pytest.raises(ConfigError, match="unknown pairing"):
        _collect(tmp_path, pairing="sideways")
    with pytest.raises(SaqError, match="does not exist"):
        TrajectoryDataset.open(tmp_path / "missing")
    _collect(tmp_path, name="done", steps=2, num_samples=1)
    with pytest.raises(ConfigError, match="already exists"):
        _collect(tmp_path, name="done", steps=2, num_samples=1)
    ds, _, _ = _collect(tmp_path, name="done", steps=3, num_samples=1, overwrite=True)
    assert len(ds) == 3 and len(list(tmp_path.iterdir())) == 1  # no temp folders left


def test_no_heavy_imports():
    code = ("import sys, saq_deploy.calibrate.trajectory, saq_deploy.calibrate.dataset; "
            "bad = [m for m in ('onnxruntime', 'tensorrt') if m in sys.modules]; sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


def test_stale_temp_folder_of_a_killed_collection_is_removed(tmp_path, capsys):
    # what a kill -9 during collection leaves: a half-written '.traj.<rand>.tmp' beside the output
    stale = tmp_path / ".traj.abc123.tmp"
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    _collect(tmp_path, "traj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traj"]
    assert f"removed stale temp folder {stale}" in capsys.readouterr().err
