"""The learning-rate / weight-decay schedule: warmup, decay shapes and the Spectra TriLM phases."""

import math

import pytest

from spectra.errors import ConfigError
from spectra.train import Schedule, SchedulePhase, TrainConfig


def config(kind: str, **kw) -> TrainConfig:
    return TrainConfig(data="unused", out_dir="unused", kind=kind, steps=1000, warmup_steps=10, **kw)


def test_trilm_default_schedule_matches_the_spec():
    s = config("ternary").make_schedule()
    assert s.peak_lr == 2.4e-3 and s.decay == "linear" and s.min_lr_ratio == 0.1

    def linear(step):  # warmup done: linear from 1 to 0.1 over steps 10..1000
        return 0.1 + 0.9 * (1 - (step - 10) / 990)

    assert s.lr(0) == pytest.approx(2.4e-3 / 10)
    assert s.lr(9) == pytest.approx(2.4e-3)
    assert s.lr(250) == pytest.approx(2.4e-3 * linear(250))
    assert s.lr(499) == pytest.approx(2.4e-3 * linear(499))
    # Half of training: the peak LR drops to 0.625x and the decay goes on from the lower peak.
    assert s.lr(500) == pytest.approx(2.4e-3 * 0.625 * linear(500))
    assert s.lr(999) == pytest.approx(2.4e-3 * 0.625 * linear(999))
    # Two thirds: weight decay switches off (round(2/3 * 1000) = 667).
    assert [s.weight_decay_at(k) for k in (0, 499, 666)] == [0.1, 0.1, 0.1]
    assert [s.weight_decay_at(k) for k in (667, 800, 999)] == [0.0, 0.0, 0.0]


def test_floatlm_default_schedule_is_plain_cosine():
    s = config("float").make_schedule()
    assert s.peak_lr == 1e-3 and s.decay == "cosine" and s.phases == ()
    for step in (10, 333, 500, 667, 999):
        shape = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 990))
        assert s.lr(step) == pytest.approx(1e-3 * shape)
        assert s.weight_decay_at(step) == 0.1


def test_phases_are_configurable():
    moved = config("ternary", lr_drop_at=0.25, lr_drop_scale=0.5, wd_off_at=None).make_schedule()
    assert moved.lr(249) / moved.shape(249) == pytest.approx(2.4e-3)
    assert moved.lr(250) / moved.shape(250) == pytest.approx(1.2e-3)
    assert moved.weight_decay_at(999) == 0.1
    plain = config("ternary", schedule="plain").make_schedule()
    assert plain.phases == () and plain.lr(600) == pytest.approx(2.4e-3 * plain.shape(600))
    forced = config("float", schedule="spectra").make_schedule()
    assert forced.weight_decay_at(700) == 0.0
    custom = config("float", phases=[{"at": 0.1, "weight_decay": 0.05}, {"at": 0.9, "lr_scale": 0.1}]).make_schedule()
    assert custom.weight_decay_at(99) == 0.1 and custom.weight_decay_at(100) == 0.05
    assert custom.lr(900) / custom.shape(900) == pytest.approx(1e-4)
    assert custom.weight_decay_at(950) == 0.05  # a phase keeps what it does not set


def test_schedule_shapes_and_bad_values():
    s = Schedule(total_steps=7, peak_lr=1.0, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert [round(s.lr(k), 6) for k in range(7)] == [round(1 - k / 7, 6) for k in range(7)]
    assert Schedule(total_steps=5, peak_lr=0.5, decay="constant").lr(4) == 0.5
    with pytest.raises(ConfigError, match="decay"):
        Schedule(total_steps=5, peak_lr=1.0, decay="step")
    with pytest.raises(ConfigError, match="fraction"):
        SchedulePhase(at=1.5, lr_scale=0.5)
    with pytest.raises(ConfigError, match="phase"):
        config("float", phases=[{"start": 0.5}])
    with pytest.raises(ConfigError, match="kind"):
        config("binary")
