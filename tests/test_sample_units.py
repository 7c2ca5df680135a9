"""`ditdeploy sample` building blocks: labels, per-image noise, uint8 conversion, grid, npz parts and merge."""

from __future__ import annotations

import numpy as np
import pytest

from ditdeploy.errors import DitDeployError
from ditdeploy.run import images, noise_contract, shard_workers
from ditdeploy.run.generation import IMAGENET_DEMO_LABELS, parse_labels
from ditdeploy.run.generation import row_len as _row_len


def test_labels_from_spec_and_defaults():
    assert parse_labels("207,360", None, 1000) == ([207, 360], None)
    assert parse_labels("1, 3", 2, 10) == ([1, 1, 3, 3], 2)
    labs, row = parse_labels(None, None, 10)
    assert labs == [c for c in range(10) for _ in range(6)] and row == 6
    assert parse_labels(None, 1, 10) == (list(range(10)), None)
    assert parse_labels(None, None, 1000) == (list(IMAGENET_DEMO_LABELS), None)
    with pytest.raises(DitDeployError, match=r"labels \[10\] out of range: this model has classes 0\.\.9"):
        parse_labels("3,10", None, 10)
    with pytest.raises(DitDeployError, match="comma-separated"):
        parse_labels("a,b", None, 10)
    with pytest.raises(DitDeployError, match="num-per-label"):
        parse_labels(None, 0, 10)


def test_per_image_noise_does_not_depend_on_batching():
    shape = (2, 4, 4)
    full = noise_contract.initial_noise(7, np.arange(10), shape)
    part = noise_contract.initial_noise(7, [3, 4, 5], shape)
    np.testing.assert_array_equal(part, full[3:6])
    assert not np.array_equal(full[0], full[1])
    assert not np.array_equal(full, noise_contract.initial_noise(8, np.arange(10), shape))
    a, b = noise_contract.PerImageNoise(7, np.arange(10)), noise_contract.PerImageNoise(7, [4, 5])
    for step in range(3):  # the same stream per image, step after step
        np.testing.assert_array_equal(a(step, (10, *shape))[4:6], b(step, (2, *shape)))
    # per-step noise is a different stream from the initial noise
    assert not np.array_equal(noise_contract.PerImageNoise(7, [0])(0, (1, *shape)), full[:1])


def test_uint8_matches_the_official_conversion():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 2.0, np.nan], dtype=np.float32).reshape(1, 1, 1, 9)
    u8 = images.to_uint8(x)
    assert u8.shape == (1, 1, 9, 1) and u8.dtype == np.uint8
    # sample_ddp.py: clamp(127.5 * x + 128, 0, 255).to(uint8) truncates; NaN -> 0 -> 128
    want = [0, 0, 64, 128, 166, 255, 255, 255, 128]
    assert u8.ravel().tolist() == want


def test_grid_layout_rows_per_class():
    imgs = np.zeros((12, 8, 8, 1), np.uint8)
    imgs[:, 2:6, 2:6] = 255
    g = images.grid(imgs, [c for c in range(4) for _ in range(3)], cols=3)
    tile = 64  # 8 px upscaled 8x
    assert g.mode == "RGB"
    assert g.size[1] == 4 * (tile + 2) + 2  # 4 rows, no per-tile caption
    assert g.size[0] > 3 * (tile + 2)  # label margin on the left
    # a tile's centre is the image's white square, upscaled with nearest neighbour
    arr = np.asarray(g)
    left = g.size[0] - 3 * (tile + 2) - 2
    assert arr[2 + tile // 2, left + 2 + tile // 2].tolist() == [255, 255, 255]
    # mixed labels per row -> captions under each tile
    g2 = images.grid(imgs[:5], [0, 1, 2, 3, 4], cols=5)
    assert g2.size[1] > 64 + 4


def test_row_len_detection():
    assert _row_len(np.repeat(np.arange(4), 3)) == 3
    assert _row_len(np.array([1, 2, 3])) is None
    assert _row_len(np.array([1, 1, 2, 3])) is None


def test_shard_ranges_cover_everything():
    for n in (0, 1, 7, 10, 101):
        for k in (1, 2, 3, 8):
            ranges = [shard_workers.shard_range(n, i, k) for i in range(k)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    assert shard_workers.parse_shard("2/4") == (2, 4)
    with pytest.raises(DitDeployError):
        shard_workers.parse_shard("4/4")


def _parts(tmp_path, arr, labels, k):
    final = tmp_path / "all.npz"
    paths = []
    for i in range(k):
        a, b = shard_workers.shard_range(len(arr), i, k)
        p = shard_workers.part_path(final, i, k)
        perm = np.random.default_rng(i).permutation(np.arange(a, b))  # parts need not be sorted inside
        images.save_npz(p, arr[perm], labels[perm], index=perm)
        paths.append(p)
    return final, paths


def test_merge_parts_restores_global_order(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=23)
    final, paths = _parts(tmp_path, arr, labels, 3)
    n, shape = shard_workers.merge_parts(final, paths[::-1], n=23)  # any order of parts
    assert (n, shape) == (23, (4, 4, 3))
    z = images.load_npz(final)
    np.testing.assert_array_equal(z["arr_0"], arr)
    np.testing.assert_array_equal(z["labels"], labels)
    assert z["arr_0"].dtype == np.uint8 and sorted(z) == ["arr_0", "labels"]
    assert not any(p.exists() for p in paths)


def test_merge_refuses_gaps_and_missing_parts(tmp_path):
    arr = np.zeros((10, 2, 2, 1), np.uint8)
    final, paths = _parts(tmp_path, arr, np.zeros(10, np.int64), 2)
    with pytest.raises(DitDeployError, match="gaps"):
        shard_workers.merge_parts(final, paths[:1], n=10)
    paths[1].unlink()
    with pytest.raises(DitDeployError, match="missing"):
        shard_workers.merge_parts(final, paths, n=10)
    assert not final.exists()


def test_save_npz_is_atomic_and_adm_layout(tmp_path):
    p = tmp_path / "s.npz"
    images.save_npz(p, np.ones((2, 3, 3, 3), np.uint8), np.array([1, 2]))
    z = np.load(p)
    assert z["arr_0"].shape == (2, 3, 3, 3) and z["labels"].dtype == np.int64
    with pytest.raises(DitDeployError):
        images.save_npz(p, np.ones((2, 3, 3, 3), np.float32), np.array([1, 2]))
    assert [f.name for f in tmp_path.iterdir()] == ["s.npz"]
