"""The shipped digits model (ditdeploy/assets/digits.safetensors): guided samples are the requested digits
(classified by an SVC trained on real digits), diverse, and not copies of training images."""

from __future__ import annotations

import pytest
import torch

from ditdeploy.sources.shipped import DIGITS_CHECKPOINT as ASSET


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not ASSET.exists(), reason="shipped digits model not present")
def test_shipped_digits_model_quality():
    from ditdeploy.sources.checkpoints import load_model
    from experiments.digits_quality import evaluate

    m = load_model(ASSET)
    assert m.config.variant == "digits" and m.config.num_classes == 10 and m.config.space == "pixel"

    # 100 samples (10 per class), 25 DDIM steps, cfg 3
    r = evaluate(ASSET, n_per_class=10, cfg_scale=3.0, method="ddim", steps=25, seed=0, threads=1)
    assert r["samples"] == 100
    assert r["classifier_heldout_accuracy"] >= 0.97  # the judge itself is good on real held-out digits
    assert r["accuracy"] >= 0.90, r["per_class_accuracy"]
    assert min(r["per_class_accuracy"].values()) >= 0.6, r["per_class_accuracy"]
    # diverse: within-class spread at least half of real digits' (mode collapse would be ~0)
    assert r["within_class_pixel_std"]["ratio"] >= 0.5
    assert r["within_class_pairwise_l2"]["ratio"] >= 0.5
    # not copies: nearest training image about as far as for real unseen digits, and never ~0
    nn = r["nn_l2_to_train"]
    assert nn["ratio_median"] >= 0.6 and nn["samples_min"] > 2.0 and nn["samples_below_1"] == 0
