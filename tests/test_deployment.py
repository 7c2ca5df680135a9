"""open_deployment: one handle for an artifact's denoiser, decoder, manifest, class names and reference checkpoint
(what sample / check / bench / calibrate / fid / serve use instead of their own lookups)."""

from __future__ import annotations

import numpy as np
import pytest
import rt_artifacts
from conftest import copy_artifact

from ditdeploy.errors import DitDeployError
from ditdeploy.run.deployment import open_deployment


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return rt_artifacts.latent_artifacts(tmp_path_factory.getbasetemp() / "rt")


def test_default_is_the_shipped_digits_model_and_nothing_loads_until_used():
    from ditdeploy.sources import shipped

    d = open_deployment()
    assert d.path == shipped.DIGITS_ONNX and d.backend == "onnxruntime"
    assert d.config.variant == "digits" and d.class_names == {i: str(i) for i in range(10)}
    assert d.reference_checkpoint() == shipped.digits_checkpoint()  # the manifest names no file: shipped weights
    assert d.decoder_path() is None and not d.loaded  # manifest, config, names, reference: no session yet
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    out = d.denoiser(x, np.array([10, 500]), np.array([1, 2]))
    assert d.loaded and out.shape == (2, 2, 8, 8) and np.isfinite(out).all()
    assert d.decoder is None  # pixel space


def test_options_are_checked_against_the_backend_by_flag():
    with pytest.raises(DitDeployError, match="--precision-hint applies to the openvino backend only, not onnxruntime"):
        open_deployment(None, "onnxruntime", {"precision_hint": "bf16"})
    d = open_deployment(None, "ort", {"threads": 1, "providers": None, "trust_native_code": True})
    assert d.backend == "onnxruntime" and d.options == {"threads": 1}  # unset dropped; trust ignored by ORT


def test_latent_decoder_found_once_from_the_manifest_and_loaded_on_the_same_backend(latent):
    d = open_deployment(latent["onnx"], options={"threads": 1})
    assert d.decoder_path() == latent["dir"] / "vae.onnx"
    dec = d.decoder
    assert dec is d.decoder  # loaded once
    assert dec.name.startswith("onnxruntime")
    z = np.random.default_rng(1).standard_normal((1, 4, 4, 4), dtype=np.float32)
    ref = open_deployment(latent["onnx"], vae=latent["dir"] / "vae_dir").decoder  # the torch reference decoder
    np.testing.assert_allclose(dec(z), ref(z), rtol=0, atol=1e-4)  # fp32 ORT vs torch: ~1e-6 measured


def test_latent_without_decoder_is_one_line_error_but_optional_for_check(latent, tmp_path):
    art = copy_artifact(latent["onnx"], tmp_path)  # the manifest names vae.onnx, which is not copied
    d = open_deployment(art)
    assert d.optional_decoder() is None
    with pytest.raises(DitDeployError, match="VAE decoder .*vae.onnx not found"):
        _ = d.decoder


def test_reference_checkpoint_lookup(latent, tmp_path):
    d = open_deployment(latent["onnx"])  # exported from a model in memory: its manifest names no checkpoint
    with pytest.raises(DitDeployError, match="reference checkpoint .*nope.pt not found"):
        d.reference_checkpoint(tmp_path / "nope.pt")
    assert d.reference_checkpoint(latent["ckpt"]) == latent["ckpt"]
    assert d.reference_checkpoint(required=False) is None  # bench: a random-weights baseline then
    with pytest.raises(DitDeployError, match="no PyTorch reference for lt.onnx"):
        d.reference_checkpoint()
