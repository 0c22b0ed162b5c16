"""The statistics of an evaluation (directalign.eval.stats) and the drift rules of directalign.metrics."""

import math

import pytest

from directalign.eval.stats import mean_ci, t_quantile_975
from directalign.metrics import drift_warnings


def test_statistics_and_drift_rules():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-3)
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci95_high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean_ci([5.0])["ci95_low"] is None and mean_ci([])["mean"] is None
    base = {"saturation": 0.40, "brightness": 0.5, "colourfulness": 0.20, "hf_energy": 0.010, "diversity_pixel": 0.2}
    assert drift_warnings(base, dict(base)) == []
    moved = dict(base, saturation=0.55, hf_energy=0.02, diversity_pixel=0.1)
    w = drift_warnings(base, moved)
    assert [x.split()[0] for x in w] == ["saturation", "hf_energy", "diversity_pixel"]
    assert drift_warnings(base, dict(base, diversity_pixel=0.5)) == []  # more diversity is no warning
    assert drift_warnings(base, dict(base, saturation=float("nan"))) == []
