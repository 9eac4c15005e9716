"""The committed reference model generates recognizable digits of the requested class."""

from __future__ import annotations

import torch

from saq_deploy.eval.metrics import evaluate_samples
from saq_deploy.generate import SampleSettings, generate
from saq_deploy.models.loading import load_model


def test_builtin_digits_are_recognizable():
    m = load_model("builtin:digits")
    images, labels = generate(m.eps_model(), m.schedule(), m.sample_shape,
                              SampleSettings(sampler="dpmpp-2m", steps=10, cfg=1.5, seed=7, n=60),
                              num_classes=m.num_classes, null_label=m.null_label)
    r = evaluate_samples(images, labels)
    assert r["accuracy"] >= 0.95, r
    assert r["inception_score"] >= 8.0, r


def test_pure_noise_is_not():
    r = evaluate_samples(torch.rand(60, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                         torch.arange(60) % 10)
    assert r["accuracy"] < 0.5 and r["digit_fid"] > 100
