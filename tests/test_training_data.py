"""Training data: ADM center crop, ImageFolder scanning and errors, deterministic data order, digits split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditdeploy.errors import DitDeployError
from ditdeploy.training.data import (
    EpochOrder,
    center_crop_arr,
    digits_arrays,
    digits_split,
    load_image,
    scan_image_folder,
)


def test_center_crop_square_output_and_box_halving():
    # 300x200 -> short side 200 >= 2*64: BOX-halved to 150x100, then BICUBIC to 96x64, centre crop 64x64
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    out = center_crop_arr(im, 64)
    assert out.size == (64, 64)
    half = im.resize((150, 100), resample=Image.BOX).resize((96, 64), resample=Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(half)[:, 16:80])


def test_center_crop_keeps_centre_of_a_marked_image():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # a white centre square region
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 40))
    assert out.shape == (40, 40, 3) and out.min() == 255


def test_load_image_range_and_flip(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(str(tmp_path / "a.png"), 8, flip=False)
    xf = load_image(str(tmp_path / "a.png"), 8, flip=True)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert x[:, :, :4].min() == 1.0 and x[:, :, 4:].max() == -1.0
    np.testing.assert_array_equal(xf, x[:, :, ::-1])


def test_scan_image_folder_layout_and_errors(tmp_path):
    with pytest.raises(DitDeployError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DitDeployError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DitDeployError, match="contains no images"):
        scan_image_folder(tmp_path / "noimg")
    root = tmp_path / "ok"
    for c, n in (("b_dog", 2), ("a_cat", 3)):
        (root / c / "sub").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(root / c / ("sub" if i == 0 else ".") / f"{i}.png")
    idx = scan_image_folder(root)
    assert idx.classes == ("a_cat", "b_dog")
    assert len(idx) == 5 and idx.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(idx.fingerprint()) == 64


def test_epoch_order_is_deterministic_and_rank_split():
    one = EpochOrder(100, 16, seed=3)
    assert one.steps_per_epoch == 6
    # an epoch visits distinct items; the next epoch is a different permutation
    e0 = np.concatenate([one.global_items(s)[0] for s in range(6)])
    assert len(set(e0.tolist())) == 96
    assert not np.array_equal(one.global_items(0)[0], one.global_items(6)[0])
    # same (seed, step) -> same batch; ranks partition the global batch in order
    again = EpochOrder(100, 16, seed=3)
    np.testing.assert_array_equal(one.global_items(13)[0], again.global_items(13)[0])
    r0, r1 = EpochOrder(100, 16, 3, world_size=2, rank=0), EpochOrder(100, 16, 3, world_size=2, rank=1)
    for s in (0, 5, 6, 17):
        joined = np.concatenate([r0.local_items(s)[0], r1.local_items(s)[0]])
        np.testing.assert_array_equal(joined, one.global_items(s)[0])
    assert r0.state(13) == {"seed": 3, "num_items": 100, "global_batch": 16, "epoch": 2, "batch_in_epoch": 1}
    flips = np.concatenate([one.global_items(s)[1] for s in range(6)])
    assert 0.3 < flips.mean() < 0.7


@pytest.mark.parametrize("kw,msg", [({"global_batch": 0}, "positive"), ({"global_batch": 10, "world_size": 3}, "divisible"),
                                     ({"global_batch": 200}, "fewer than")])
def test_epoch_order_errors(kw, msg):
    args = {"num_items": 100, "global_batch": 16, "seed": 0} | kw
    with pytest.raises(DitDeployError, match=msg):
        EpochOrder(**args)


def test_digits_arrays_and_fixed_split():
    from sklearn.datasets import load_digits

    x, y = digits_arrays()
    d = load_digits()  # the direct read of the bundled file equals sklearn's loader
    np.testing.assert_array_equal(y, d.target)
    np.testing.assert_array_equal(x[:, 0], (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    # 0..16 maps onto 17 evenly spaced levels in [-1, 1]
    np.testing.assert_allclose(np.unique(x), np.linspace(-1, 1, 17), atol=1e-6)
    tr, te = digits_split()
    assert len(tr) == 1500 and len(te) == 297 and not set(tr.tolist()) & set(te.tolist())
    assert set(np.unique(y[te]).tolist()) == set(range(10))
    tr2, _ = digits_split()
    np.testing.assert_array_equal(tr, tr2)
