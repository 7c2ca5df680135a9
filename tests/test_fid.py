"""`ditdeploy fid` end to end through the real CLI: the offline digits FID, the ImageNet path with a RANDOM-weight
Inception of the FID architecture (plumbing only: its numbers mean nothing), ADM reference layouts, bad inputs.

Independent checks: digits real-vs-real FID is near 0 and noise is far; the report's sha256 is the weights file's;
FID does not depend on the batch size; a reference holding only precomputed ``mu``/``sigma``/``mu_s``/``sigma_s``
(ADM's layout) gives the FID/sFID of the same statistics computed from its images; the Inception features equal
the network's own outputs computed here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main

from ditdeploy.run.images import save_npz

NO_PROGRESS = ["--no-progress"]


# ------------------------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory) -> dict[str, Path]:
    from ditdeploy.fid.digits import real_digits_u8

    d = tmp_path_factory.mktemp("fid_digits")
    u8, y = real_digits_u8()
    perm = np.random.default_rng(1).permutation(len(u8))
    half = len(u8) // 2
    save_npz(d / "real_a.npz", u8[perm[:half]], y[perm[:half]])
    save_npz(d / "real_b.npz", u8[perm[half:]], y[perm[half:]])
    noise = np.random.default_rng(0).integers(0, 256, (500, 8, 8, 1), dtype=np.uint8)
    save_npz(d / "noise.npz", noise, np.zeros(500))
    return {"dir": d, "real_a": d / "real_a.npz", "noise": d / "noise.npz"}


def test_digits_real_vs_noise_through_cli(digits_sets, tmp_path):
    from ditdeploy.fid.digits import digits_extractor

    out = tmp_path / "real.json"
    code, stdout, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--json", out, *NO_PROGRESS])
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert rep["samples"]["count"] == 898 and rep["samples"]["image_shape"] == [8, 8, 1]
    assert rep["reference"]["name"] == "digits" and rep["reference"]["count"] == 1797
    assert rep["extractor"]["name"] == "digits-mlp-v1"
    assert rep["extractor"]["sha256"] == digits_extractor().weights_sha256
    assert rep["extractor"]["heldout_accuracy"] > 0.95  # the extractor recognises digits it never saw
    real = rep["metrics"]
    assert "FID" in stdout and f"{real['fid']:.4f}" in stdout
    code, _, err = run_main(["fid", digits_sets["noise"], "--ref", "digits", "--json", tmp_path / "n.json",
                             *NO_PROGRESS])
    assert code == 0, err
    noise = json.loads((tmp_path / "n.json").read_text())["metrics"]
    assert real["fid"] < 0.5 and noise["fid"] > 10.0 and noise["fid"] > 50 * real["fid"]
    assert real["inception_score"] > 9.0 > 4.0 > noise["inception_score"] >= 1.0  # 10 classes: IS <= 10
    assert real["precision"] > 0.95 and noise["precision"] < 0.3
    assert "sfid" not in real  # the digits extractor has no spatial features


def test_digits_extractor_against_an_npz_reference(digits_sets, tmp_path):
    """--extractor digits with a reference npz: real half A vs real half B is near 0, noise vs real half B is far,
    and the reference's count is the half's."""
    reps = {}
    for name in ("real_a", "noise"):
        out = tmp_path / f"{name}.json"
        code, _, err = run_main(["fid", digits_sets[name], "--ref", digits_sets["dir"] / "real_b.npz", "--extractor",
                                 "digits", "--json", out, *NO_PROGRESS])
        assert code == 0, err
        reps[name] = json.loads(out.read_text())
    assert reps["real_a"]["reference"]["count"] == 899
    assert reps["real_a"]["metrics"]["fid"] < 0.5 < 10.0 < reps["noise"]["metrics"]["fid"]
    code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--extractor", "inception", *NO_PROGRESS])
    assert_one_line_error(code, err, ["--extractor inception"])
    code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--extractor", "clip", *NO_PROGRESS])
    assert_one_line_error(code, err, ["--extractor", "clip"])


def test_digits_extractor_is_deterministic():
    """Trained twice in one process (cache cleared): bit-identical weights, so the same sha256."""
    from ditdeploy.fid import digits

    first = digits.digits_extractor().weights_sha256
    digits.digits_extractor.cache_clear()
    assert digits.digits_extractor().weights_sha256 == first


def test_digits_batch_size_does_not_change_the_numbers(digits_sets, tmp_path):
    reps = []
    for bs in ("7", "500"):
        out = tmp_path / f"b{bs}.json"
        code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--batch-size", bs, "--json", out,
                                 *NO_PROGRESS])
        assert code == 0, err
        reps.append(json.loads(out.read_text())["metrics"])
    assert reps[0]["fid"] == pytest.approx(reps[1]["fid"], rel=1e-9)
    assert reps[0]["inception_score"] == pytest.approx(reps[1]["inception_score"], rel=1e-12)


# ---------------------------------------------------------------------------------- ImageNet path, random weights
def random_inception_file(path: Path, seed: int = 0) -> Path:
    """A RANDOM-weight FID InceptionV3 (plumbing only): He-normal convolutions, random batch-norm statistics."""
    import torch

    from ditdeploy.fid.inception import build_inception

    g = torch.Generator().manual_seed(seed)
    sd = build_inception().state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bn.bias")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
    torch.save(sd, path)
    return path


def _manual_features(weights: Path, u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pool, probs, spatial computed here with the network's modules (independent of the extractor's wrapper)."""
    import torch
    import torch.nn.functional as F

    from ditdeploy.fid.inception import build_inception

    m = build_inception()
    m.load_state_dict(torch.load(weights, weights_only=True))
    m.eval()
    x = torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        pool, spatial = m(x)
        probs = torch.softmax((pool @ m.fc.weight.T).double(), 1)
    sp = spatial.numpy().transpose(0, 2, 3, 1).reshape(len(u8), -1)  # NHWC order, as ADM's TF graph flattens
    return pool.double().numpy(), probs.numpy(), sp.astype(np.float64)


def _lowrank_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two small feature sets without any d x d matrix: with centred rows A, B, s1 = A'A/(n1-1) and
    s2 = B'B/(n2-1), the eigenvalues of s1 s2 are the squared singular values of A B' / sqrt((n1-1)(n2-1))."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * tr_sqrt)


def _is(p: np.ndarray) -> float:
    marg = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marg))).sum(1).mean()))


@pytest.fixture(scope="module")
def imagenet_case(tmp_path_factory) -> dict[str, Path]:
    """A RANDOM-weight Inception file, 3 samples and an ADM-style reference: 4 images (arr_0) plus the statistics of
    their features precomputed here (mu, sigma, mu_s, sigma_s), the layout of VIRTUAL_imagenet256_labeled.npz."""
    d = tmp_path_factory.mktemp("fid_inception")
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ref = np.clip(rng.normal(128, 40, (4, 32, 32, 3)), 0, 255).astype(np.uint8)
    weights = random_inception_file(d / "inception-RANDOM-plumbing-only.pth")
    s_feats, r_feats = _manual_features(weights, samples), _manual_features(weights, ref)
    save_npz(d / "samples.npz", samples, np.zeros(3))
    rp, _, rsp = r_feats
    with open(d / "ref.npz", "wb") as f:
        np.savez(f, arr_0=ref, mu=rp.mean(0), sigma=np.cov(rp, rowvar=False), mu_s=rsp.mean(0),
                 sigma_s=np.cov(rsp, rowvar=False))
    return {"dir": d, "weights": weights, "samples": d / "samples.npz", "ref": d / "ref.npz",
            "s_feats": s_feats, "r_feats": r_feats}


def test_inception_path_end_to_end_random_weights(imagenet_case, tmp_path):
    from ditdeploy.artifact.files import sha256_file

    c = imagenet_case
    out = tmp_path / "r.json"
    code, stdout, err = run_main(["fid", c["samples"], "--ref", c["ref"], "--inception", c["weights"], "--device",
                                  "cpu", "--batch-size", "2", "--split-size", "2", "--json", out, *NO_PROGRESS])
    assert code == 0, err
    rep = json.loads(out.read_text())
    ext = rep["extractor"]
    assert ext["name"] == "fid-inception-v3" and ext["sha256"] == sha256_file(c["weights"])
    assert ext["published_weights"] is False and ext["feature_dim"] == 2048 and ext["spatial_dim"] == 2023
    assert rep["reference"]["stats"].startswith("precomputed") and rep["reference"]["count"] == 4
    m = rep["metrics"]
    assert set(m) >= {"fid", "inception_score", "sfid", "precision", "recall"} and m["is_splits"] == 2
    (sp, sprob, ssp), (rp, _, rsp) = c["s_feats"], c["r_feats"]
    assert sp.shape == (3, 2048) and ssp.shape == (3, 2023) and float(sp.std()) > 0
    # float32 network (batch 2 vs 3/4 here: other conv kernels), statistics in float64: 1e-4 relative
    assert m["fid"] == pytest.approx(_lowrank_fd(sp, rp), rel=1e-4)
    assert m["sfid"] == pytest.approx(_lowrank_fd(ssp, rsp), rel=1e-4)
    assert m["inception_score"] == pytest.approx((_is(sprob[:2]) + _is(sprob[2:])) / 2, rel=1e-4)
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0


def test_weights_of_another_architecture(imagenet_case, tmp_path):
    import torch

    sd = torch.load(imagenet_case["weights"], weights_only=True)
    sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's 1000-class head: not the FID network
    sd.pop("Mixed_7c.branch_pool.conv.weight")
    bad = tmp_path / "tv.pth"
    torch.save(sd, bad)
    code, _, err = run_main(["fid", imagenet_case["samples"], "--ref", imagenet_case["ref"], "--inception", bad,
                             *NO_PROGRESS])
    assert_one_line_error(code, err, ["not the FID InceptionV3", "missing", "another shape"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    code, _, err = run_main(["fid", imagenet_case["samples"], "--ref", imagenet_case["ref"], "--inception", junk,
                             *NO_PROGRESS])
    assert_one_line_error(code, err, ["cannot read Inception weights"])


def test_missing_weights_say_which_file_and_where(imagenet_case, tmp_path, monkeypatch):
    monkeypatch.setenv("DITDEPLOY_CACHE", str(tmp_path / "cache"))
    code, _, err = run_main(["fid", imagenet_case["samples"], "--ref", imagenet_case["ref"], *NO_PROGRESS])
    line = assert_one_line_error(code, err, ["pt_inception-2015-12-05-6726825d.pth", "DITDEPLOY_CACHE"])
    assert str(tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth") in line


# ------------------------------------------------------------------------------------------------------ bad inputs
def _bad_inputs(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {}
    with open(d / "float.npz", "wb") as f:
        np.savez(f, arr_0=rng.random((4, 8, 8, 1)).astype(np.float32))
    files["float"] = d / "float.npz"
    with open(d / "nchw.npz", "wb") as f:
        np.savez(f, arr_0=np.zeros((4, 1, 8, 8), np.uint8))
    files["nchw"] = d / "nchw.npz"
    with open(d / "noarr.npz", "wb") as f:
        np.savez(f, images=np.zeros((4, 8, 8, 1), np.uint8))
    files["noarr"] = d / "noarr.npz"
    save_npz(d / "one.npz", np.zeros((1, 8, 8, 1), np.uint8), np.zeros(1))
    files["one"] = d / "one.npz"
    save_npz(d / "rgb32.npz", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4))
    files["rgb32"] = d / "rgb32.npz"
    save_npz(d / "rgb64.npz", np.zeros((4, 64, 64, 3), np.uint8), np.zeros(4))
    files["rgb64"] = d / "rgb64.npz"
    save_npz(d / "gray32.npz", np.zeros((4, 32, 32, 1), np.uint8), np.zeros(4))
    files["gray32"] = d / "gray32.npz"
    (d / "text.npz").write_text("hello")
    files["text"] = d / "text.npz"
    with open(d / "emptyref.npz", "wb") as f:
        np.savez(f, labels=np.zeros(3))
    files["emptyref"] = d / "emptyref.npz"
    return files


BAD = [
    ("float", "digits", ["arr_0 is float32", "uint8"]),
    ("nchw", "digits", ["(4, 1, 8, 8)", "(N, H, W, C)"]),
    ("noarr", "digits", ["no arr_0"]),
    ("one", "digits", ["at least 2 samples"]),
    ("text", "digits", ["not an .npz"]),
    ("missing", "digits", ["not found"]),
    ("rgb32", "digits", ["32x32x3", "8x8x1"]),
    ("rgb32", "rgb64", ["64x64x3", "32x32x3", "resolution"]),
    ("rgb32", "gray32", ["32x32x1", "channel count"]),
    ("rgb32", "emptyref", ["neither arr_0", "mu/sigma"]),
    ("rgb32", "noarr_ref", ["not found"]),
]


@pytest.mark.parametrize("samples,ref,keywords", BAD, ids=[f"{s}-vs-{r}" for s, r, _ in BAD])
def test_bad_input_is_one_line(samples, ref, keywords, tmp_path):
    files = _bad_inputs(tmp_path)
    s = files.get(samples, tmp_path / "missing.npz")
    r = ref if ref == "digits" else files.get(ref, tmp_path / "nope.npz")
    code, _, err = run_main(["fid", s, "--ref", r, *NO_PROGRESS])
    assert_one_line_error(code, err, keywords)


def test_bad_flags(digits_sets, tmp_path):
    code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--batch-size", "0", *NO_PROGRESS])
    assert_one_line_error(code, err, ["--batch-size"])
    code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--inception", tmp_path / "w.pth",
                             *NO_PROGRESS])
    assert_one_line_error(code, err, ["--inception", "digits"])
    assert not list(tmp_path.iterdir())
    before = digits_sets["real_a"].read_bytes()
    code, _, err = run_main(["fid", digits_sets["real_a"], "--ref", "digits", "--json", digits_sets["real_a"],
                             *NO_PROGRESS])
    assert_one_line_error(code, err, ["--json"])
    assert digits_sets["real_a"].read_bytes() == before  # the report never replaces an input
