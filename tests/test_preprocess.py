"""deployq.preprocess: the image arithmetic against NumPy, and the engine values it states."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployq.errors import UsageError
from deployq.preprocess import Preprocess


def _img(h=40, w=60):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_bgr_resize_crop_normalise_match_numpy():
    img = _img()
    pre = Preprocess((1, 3, 24, 24), (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), "bgr", resize=32)
    x = pre.apply(img)
    # the reference: Pillow bilinear resize of the shorter side to 32 (60x40 -> 48x32), center crop, BGR, NumPy math
    ref = np.asarray(img.resize((48, 32), Image.BILINEAR), np.float32)[4:28, 12:36, ::-1]
    ref = (ref - np.array([10, 20, 30], np.float32)) / np.array([2, 4, 8], np.float32)
    np.testing.assert_array_equal(x, ref.transpose(2, 0, 1))
    assert pre.ncnn()["pixel_type_from_rgb"] == "PIXEL_RGB2BGR" and pre.ncnn()["pixel_type_from_bgr"] == "PIXEL_BGR"
    assert pre.tengine()["-b"] == 0 and pre.tengine()["-s"] == "0.5,0.25,0.125"


def test_gray_and_plain_resize():
    pre = Preprocess((1, 1, 8, 8), (127.5,), (127.5,))
    x = pre.apply(_img())
    ref = (np.asarray(_img().convert("L").resize((8, 8), Image.BILINEAR), np.float32) - 127.5) / 127.5
    np.testing.assert_array_equal(x[0], ref)
    assert pre.ncnn()["ncnn2table"].endswith("shape=[8,8,1] pixel=GRAY")
    assert Preprocess.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize("kw,msg", [({"mean": (1.0, 2.0)}, "1 or 3 values"), ({"std": (0.0,)}, "positive"),
                                    ({"pixel_order": "rgba"}, "rgb or bgr"), ({"resize": 10}, "smaller than")])
def test_bad_values(kw, msg):
    args = {"input_shape": (1, 3, 16, 16), "mean": (0.0,), "std": (1.0,), **kw}
    with pytest.raises(UsageError, match=msg):
        Preprocess(**args)
