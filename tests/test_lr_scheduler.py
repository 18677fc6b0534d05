"""lr_scheduler / lr_warmup_steps: the factor's shape, and the schedule over a real run."""

import math

import pytest
from test_reliability import build


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_factor_warms_up_then_decays_to_zero_at_the_last_step(tiny_config_dict, kind):
    trainer, *_ = build(tiny_config_dict, lr_scheduler=kind, lr_warmup_steps=3)
    trainer.total_steps = 13
    factors = [trainer.lr_factor(step) for step in range(14)]
    assert factors[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])  # warm-up, never 0
    assert factors[3] == pytest.approx(1.0) and factors[13] == pytest.approx(0.0)
    middle = 0.5 if kind == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
    assert factors[8] == pytest.approx(middle)  # halfway through the 10 decay steps
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_a_run_ends_at_zero_learning_rate_after_the_counted_steps(tiny_config_dict):
    trainer, train, valid, _ = build(
        tiny_config_dict, lr_scheduler="linear", epochs=2, stopping_step=10, train_sample_num=40, train_batch_size=16
    )
    assert trainer.steps_per_epoch(train) == 3  # ceil(40 / 16)
    base = trainer.optimizer.param_groups[0]["lr"]
    seen = []
    step = trainer._step

    def record(batches, scaler):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(batches, scaler)

    trainer._step = record
    trainer.fit(train, valid, saved=False)
    assert trainer.total_steps == 6 and len(seen) == 6
    assert seen == pytest.approx([base * (1 - k / 6) for k in range(6)])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_constant_has_no_scheduler(tiny_config_dict):
    trainer, *_ = build(tiny_config_dict)
    assert trainer.scheduler is None


def test_models_on_recboles_plain_loop_keep_a_constant_rate(tiny_config_dict):
    trainer, *_ = build(tiny_config_dict, model_name="Pop", lr_scheduler="linear", lr_warmup_steps=5)
    assert trainer.losses_fn is None and trainer.scheduler is None  # a warm-up nothing would step
