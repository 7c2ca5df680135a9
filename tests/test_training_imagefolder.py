"""ImageFolder + a tiny random diffusers AutoencoderKL: on-the-fly VAE latents and the precomputed latent cache
give the same training losses; the cache is reused, and refused when built for other settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditdeploy.cli import main as cli_main

pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    d = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("class_a", "class_b", "class_c"):
        (root / c).mkdir()
        for i in range(6):  # non-square sizes exercise the center crop
            h, w = int(rng.integers(32, 80)), int(rng.integers(32, 80))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _args(data: Path, vae: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--vae", str(vae), "--image-size", "32", "--model", "S/2",
            "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--global-batch", "8", "--steps", "4",
            "--log-every", "1", "--ckpt-every", "4", "--threads", "1", "--num-workers", "0", "--no-progress",
            "--out", str(out), *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_latent_cache_matches_on_the_fly(tmp_path, image_folder, tiny_vae):
    fly, cached = tmp_path / "fly", tmp_path / "cached"
    cli_main(_args(image_folder, tiny_vae, fly))
    cli_main(_args(image_folder, tiny_vae, cached, "--precompute-latents"))
    cache = cached / "latents"
    moments = np.load(cache / "moments.npy", mmap_mode="r")
    assert moments.shape == (18, 2, 2, 4, 4, 4)  # images, orientations, (mean, logvar), latent C, h, w
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["classes"] == ["class_a", "class_b", "class_c"] and meta["image_size"] == 32
    # same images, flips, VAE noise and diffusion noise: only the VAE's batch composition differs (fp32 rounding)
    a, b = _losses(fly), _losses(cached)
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # the on-the-fly model config: latent 4x4x4, 3 classes
    from ditdeploy.sources.checkpoints import load_model

    m = load_model(fly / "ema.safetensors")
    assert (m.config.input_size, m.config.in_channels, m.config.num_classes) == (4, 4, 3)

    # image decoding in data-loader worker processes gives the same batches
    workers = tmp_path / "workers"
    cli_main(_args(image_folder, tiny_vae, workers, "--num-workers", "2"))  # the last value of an option wins
    assert _losses(workers) == a

    # a second run reuses the cache (same data + VAE) and reproduces the losses exactly
    again = tmp_path / "again"
    cli_main(_args(image_folder, tiny_vae, again, "--precompute-latents", "--latent-cache", str(cache)))
    assert _losses(again) == b


def test_latent_cache_built_for_other_settings_is_refused(tmp_path, image_folder, tiny_vae, capsys):
    first = tmp_path / "first"
    cli_main(_args(image_folder, tiny_vae, first, "--precompute-latents", "--no-flip", "--steps", "1"))
    assert np.load(first / "latents" / "moments.npy", mmap_mode="r").shape[1] == 1  # one orientation
    with pytest.raises(SystemExit):
        cli_main(_args(image_folder, tiny_vae, tmp_path / "second", "--precompute-latents", "--latent-cache",
                       str(first / "latents")))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: latent cache") and "different flip" in err and len(err.splitlines()) == 1


def test_vae_folder_errors(tmp_path, image_folder, capsys):
    (tmp_path / "novae").mkdir()
    with pytest.raises(SystemExit):
        cli_main(_args(image_folder, tmp_path / "novae", tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert "is not a diffusers AutoencoderKL folder" in err and len(err.splitlines()) == 1
    # a corrupt image file is named in a one-line error
    bad = tmp_path / "bad" / "c"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not a png")
    from ditdeploy.errors import DitDeployError
    from ditdeploy.training.data import load_image

    with pytest.raises(DitDeployError, match="cannot read image"):
        load_image(str(bad / "x.png"), 32, False)
