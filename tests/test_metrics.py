"""Throughput, MFU and the time that does not count as training (eval, samples, checkpoints)."""

import math

import pytest

from smollm2.observe.metrics import Throughput, flops_per_token


def test_mfu_arithmetic():
    per_token = flops_per_token(123_654_144, 12, 12, 64, 2048)
    assert per_token == 6 * 123_654_144 + 12 * 12 * 12 * 64 * 2048
    meter = Throughput(tokens_per_step=1000, flops_per_token=1e9, peak_tflops=100.0, world_size=2)
    meter.start -= 2.0  # pretend 2 s passed over 4 steps
    for _ in range(4):
        meter.step()
    m = meter.measure(remaining_steps=10)
    assert m["tok_per_s"] == pytest.approx(2000, rel=0.01)
    assert m["mfu"] == pytest.approx(2000 * 1e9 / (100e12 * 2), rel=0.01)
    assert m["step_ms"] == pytest.approx(500, rel=0.01) and m["eta_s"] == pytest.approx(5, rel=0.01)
    assert math.isclose(meter.measure(0)["tok_per_s"], 0.0, abs_tol=1e-6)


def test_throughput_excludes_paused_time():
    import time

    meter = Throughput(tokens_per_step=100, flops_per_token=1.0, peak_tflops=None, world_size=1)
    meter.step()
    with meter.paused():  # an eval or a checkpoint
        time.sleep(0.3)
    m = meter.measure(remaining_steps=0)
    assert m["step_ms"] < 150 and m["mfu"] is None
