import math

import pytest

from litattn.stats import format_ci, paired_ci, t_quantile_975


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """Student's t CDF by Simpson's rule on its density: an independent check of the quantile table."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_quantiles_leave_2_5_percent_in_each_tail(df):
    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_paired_ci_against_a_hand_computed_interval():
    # differences 1, 2, 3: mean 2, sample std 1, standard error 1/sqrt(3), t(0.975, 2) = 4.303
    mean, half = paired_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-9)
    assert format_ci(mean, half, ".2f") == "+2.00 [-0.48, +4.48]"  # contains 0: no mark
    assert format_ci(*paired_ci([0.30, 0.32, 0.31]), ".2f") == "+0.31 [+0.29, +0.33] *"
    assert format_ci(*paired_ci([-0.30, -0.32, -0.31]), ".2f").endswith("] *")
    mean, half = paired_ci([0.5])
    assert mean == 0.5 and math.isnan(half) and format_ci(mean, half, ".2f") == "+0.50 (one seed)"
    with pytest.raises(ValueError, match="at least one"):
        paired_ci([])
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile_975(0)
