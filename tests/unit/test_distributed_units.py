"""The pieces of the data-parallel paths that need no process group (docs/design/distributed.md):
the per-rank split, the range shard writer against the one-process writer, and LSQ's activation
step gradient under a batch share."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from saq_deploy.calibrate.dataset import RangeShardWriter, ShardWriter, merge_fragments
from saq_deploy.errors import ConfigError
from saq_deploy.quant.fake_quant import ActQuantizer
from saq_deploy.quant.quantizer import batch_share
from saq_deploy.utils.distributed import World, env_world, shard_range, timeout_s


def test_shard_range_partitions_in_rank_order():
    for n in (0, 1, 5, 7, 64):
        for size in (1, 2, 3, 8):
            parts = [shard_range(n, World(r, size)) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_env_world_and_timeout_read_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    w = env_world()
    assert (w.rank, w.size, w.local_rank, w.active, w.is_rank0) == (3, 4, 3, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent"):
        env_world()
    monkeypatch.setenv("SAQ_DEPLOY_DIST_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="positive"):
        timeout_s()
    monkeypatch.setenv("SAQ_DEPLOY_DIST_TIMEOUT", "12.5")
    assert timeout_s() == 12.5


def _chunks(start: int, stop: int, step: int):
    """Record chunks as the collector adds them (one per sampler step), with distinct values."""
    for a in range(start, stop, step):
        b = min(a + step, stop)
        yield {"x_outer": torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 3) / 7,
               "sample": torch.arange(a, b, dtype=torch.long)}


def _digests(folder, shards):
    return [(s["file"], s["records"], hashlib.sha256((folder / s["file"]).read_bytes()).hexdigest()) for s in shards]


@pytest.mark.parametrize("cuts", [(0, 18, 30), (0, 14, 21, 30), (0, 30), (0, 0, 9, 30)])
def test_range_writers_reassemble_the_one_process_shards(tmp_path, cuts):
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one, 7)
    for c in _chunks(0, 30, 4):
        w.add(c)
    want = _digests(one, w.close())
    many = tmp_path / f"many{len(cuts)}"
    many.mkdir()
    pieces = []
    for lo, hi in itertools.pairwise(cuts):  # each "rank" sees only its own range
        rw = RangeShardWriter(many, 7, lo, hi, 30)
        for c in _chunks(lo, hi, 4):
            rw.add(c)
        pieces += rw.close()
    shards = merge_fragments(many, pieces)
    assert _digests(many, shards) == want
    assert [s["sha256"] for s in shards] == [d[2] for d in want]
    assert sorted(p.name for p in many.iterdir()) == [d[0] for d in want]  # fragments removed


def test_range_writer_refuses_a_short_range(tmp_path):
    rw = RangeShardWriter(tmp_path, 7, 0, 10, 30)
    rw.add(next(_chunks(0, 4, 4)))
    with pytest.raises(Exception, match="expected 10"):
        rw.close()


def test_lsq_step_gradient_of_two_halves_sums_to_the_whole_batch():
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    def grad(xs, share):
        q = ActQuantizer(8)
        q.set_step(torch.tensor([0.05]))
        with batch_share(share):  # each half's mean loss weighted by its share, as a rank does
            q(xs.requires_grad_()).pow(2).mean().mul(len(xs) / len(x)).backward()
        return q.step.grad


    whole = grad(x.clone(), 1.0)
    halves = grad(x[:4].clone(), 0.5) + grad(x[4:].clone(), 0.5)
    assert torch.allclose(halves, whole, rtol=1e-5)
    unscaled = grad(x[:4].clone(), 1.0) + grad(x[4:].clone(), 1.0)  # what a rank computed before
    assert not torch.allclose(unscaled, whole, rtol=1e-2)
