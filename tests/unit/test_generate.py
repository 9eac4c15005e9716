"""generate(): an explicit timestep grid, a range of batches, per-batch step callbacks.

The trajectory recorder (saq_deploy.calibrate.trajectory) samples through generate() on its own
outer grid and, under torchrun, one rank's batches at a time; these pin what it relies on."""

from __future__ import annotations

import pytest
import torch

from saq_deploy.calibrate.trajectory import outer_grid
from saq_deploy.errors import ConfigError
from saq_deploy.generate import SampleSettings, batch_rows, class_labels, generate, initial_noise
from saq_deploy.models.guidance import ClassifierFreeGuidance
from saq_deploy.samplers import sample_ddim
from saq_deploy.schedules import VPSchedule
from tests.helpers import linear_schedule

SHAPE = (1, 2, 2)
NULL = 3


def _schedule() -> VPSchedule:
    return linear_schedule()


class Toy:
    """An analytic, label-dependent eps model that counts its calls."""

    def __init__(self, schedule: VPSchedule) -> None:
        self.schedule, self.calls = schedule, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        view = (-1,) + (1,) * (x.ndim - 1)
        sig = self.schedule.sigma(t.double()).to(x.dtype).view(view)
        out = 0.5 * sig * x + 0.1 * (t.to(x.dtype) / 1000).view(view)
        if cond is not None:
            out = out + 0.05 * (cond.to(x.dtype) + 1).view(view) * torch.tanh(x)
        return out


def _settings(**kw) -> SampleSettings:
    args = {"sampler": "ddim", "steps": 4, "cfg": 2.0, "seed": 11, "n": 10, "batch_size": 3}
    args.update(kw)
    return SampleSettings(**args)


def test_explicit_grid_runs_the_sampler_on_it_as_given():
    sched = _schedule()
    s = _settings()
    grid = outer_grid("dpm-solver-2", s.steps, sched, "quadratic")  # not ddim's own (leading, strided) grid
    out, labels = generate(Toy(sched), sched, SHAPE, s, num_classes=3, null_label=NULL, timesteps=grid)
    x_T, want_labels = initial_noise(SHAPE, s.n, s.seed), class_labels(s.n, 3, None)
    guided = ClassifierFreeGuidance(Toy(sched), s.cfg, NULL)
    want = torch.cat([sample_ddim(guided, x_T[i:i + 3].clone(), sched, grid, cond=want_labels[i:i + 3])
                      for i in range(0, s.n, 3)])
    assert torch.equal(out, want) and torch.equal(labels, want_labels)
    default, _ = generate(Toy(sched), sched, SHAPE, s, num_classes=3, null_label=NULL)
    assert not torch.equal(default, out)  # the grid was used, not ignored


def test_wrong_length_grid_fails_before_sampling():
    sched = _schedule()
    model = Toy(sched)
    grid = outer_grid("dpm-solver-2", 5, sched, "quadratic")  # 6 points for a 4-step run
    with pytest.raises(ConfigError, match=r"^an explicit grid for 4 steps needs 5 points, got 6$"):
        generate(model, sched, SHAPE, _settings(), num_classes=3, null_label=NULL, timesteps=grid)
    assert model.calls == 0


def test_a_range_of_batches_gives_the_full_runs_rows():
    sched = _schedule()
    s = _settings()
    full, full_labels = generate(Toy(sched), sched, SHAPE, s, num_classes=3, null_label=NULL)
    seen, done = [], []

    def recorder(rows: slice, cond: torch.Tensor | None):
        seen.append((rows.start, rows.stop, cond.tolist()))
        return lambda info: None

    part, labels = generate(Toy(sched), sched, SHAPE, s, num_classes=3, null_label=NULL, batches=range(1, 4),
                            step_callback_for=recorder, on_batch=done.append)
    assert torch.equal(part, full[3:10]) and torch.equal(labels, full_labels[3:10])
    assert seen == [(3, 6, [0, 1, 2]), (6, 9, [0, 1, 2]), (9, 10, [0])] and done == [3, 6, 7]
    none, none_labels = generate(Toy(sched), sched, SHAPE, s, num_classes=3, null_label=NULL, batches=range(2, 2))
    assert none.shape == (0, *SHAPE) and none_labels.shape == (0,)


def test_batch_rows_and_bad_ranges():
    assert batch_rows(10, 3) == range(10)
    assert batch_rows(10, 3, range(3, 4)) == range(9, 10)
    assert batch_rows(10, 3, range(4, 4)) == range(10, 10)
    for bad in (range(5), range(0, 4, 2), range(-1, 2)):
        with pytest.raises(ConfigError, match="contiguous range of batch indices within 0..4"):
            batch_rows(10, 3, bad)
    sched = _schedule()
    with pytest.raises(ConfigError, match="not both"):
        generate(Toy(sched), sched, SHAPE, _settings(), step_callback=print, step_callback_for=lambda *a: None)
