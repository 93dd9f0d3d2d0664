import numpy as np
import pytest

from ctssl.preprocess.normalize import normalize, sample_foreground, zscore_statistics


def test_window_clips_and_scales():
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1200.0])
    out = normalize(hu, {"scheme": "window", "window": [-175, 250]})
    assert np.allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_zscore_uses_clipped_foreground_statistics():
    rng = np.random.default_rng(0)
    image = rng.normal(50.0, 10.0, size=(30, 30, 30))
    image[0] = 3000.0  # outliers outside the foreground percentiles
    label = np.zeros_like(image, dtype=np.uint8)
    label[5:25, 5:25, 5:25] = 1
    stats = zscore_statistics([sample_foreground(image, label, rng)], (0.5, 99.5))
    assert stats["mean"] == pytest.approx(50.0, abs=0.5)
    assert stats["std"] == pytest.approx(10.0, rel=0.05)
    out = normalize(image, {"scheme": "zscore"}, stats)
    assert out[0].max() == pytest.approx((stats["clip_high"] - stats["mean"]) / stats["std"])
    assert abs(out[label == 1].mean()) < 0.05


def test_unlabelled_foreground_is_the_body():
    image = np.full((10, 10, 10), -1000.0)
    image[2:8, 2:8, 2:8] = 40.0
    values = sample_foreground(image, None, np.random.default_rng(0))
    assert values.size == 216 and np.all(values == 40.0)


def test_zscore_without_statistics_is_an_error():
    with pytest.raises(ValueError, match="statistics"):
        normalize(np.zeros(3), {"scheme": "zscore"})
