"""featx auto's learning-curve estimate carries its noise: on a handful of comparison images it says it cannot
tell whether more labels help, instead of printing a bare number."""
from featx.autosearch import curve_fit

POINTS = [{"images": 20, "accuracy": 0.8}, {"images": 28, "accuracy": 0.0}, {"images": 46, "accuracy": 0.6}]


def test_a_curve_on_five_images_is_within_noise():
    fit = curve_fit(POINTS, rows=5)
    low, high = fit["interval95"]
    assert low < fit["gain_per_doubling"] < high and low < 0 < high and fit["within_noise"]
    assert "cannot tell whether more labels help" in fit["estimate"]


def test_a_steep_curve_on_many_images_is_told_apart():
    points = [{"images": 250, "accuracy": 0.70}, {"images": 500, "accuracy": 0.80}, {"images": 1000, "accuracy": 0.90}]
    fit = curve_fit(points, rows=2000)
    assert abs(fit["gain_per_doubling"] - 0.10) < 1e-9 and fit["interval95"][0] > 0 and not fit["within_noise"]
