"""Early validation (issue 14): --labels spellings, npz members bounded before they are inflated, outputs of every
writing command checked against its inputs, counts against memory, and a runtime's own log lines kept off stderr."""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main

from ditdeploy.artifact.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "ditdeploy" / "assets"
FAST = ["--steps", "2", "--no-progress"]


@pytest.fixture()
def model(tmp_path) -> Path:
    for f in ("digits.onnx", "digits.onnx.json"):
        shutil.copyfile(ASSETS / f, tmp_path / f)
    return tmp_path / "digits.onnx"


# --------------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("spec", ["3 7", "3, 7", " 3,7 ", "3\t7", "3,,7"])
def test_labels_separated_by_commas_or_spaces(model, tmp_path, spec):
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--engine", model, "--labels", spec, "--no-out", "--npz", npz, *FAST])
    assert code == 0, err
    with np.load(npz) as z:
        assert z["labels"].tolist() == [3, 7]  # "3 7" is two classes, not class 37


@pytest.mark.parametrize("spec,words", [("", ("--labels", "empty")), (" ", ("--labels", "empty")),
                                        (",", ("--labels", "empty")), ("3;7", ("class", "3;7")),
                                        ("three", ("class", "three"))])
def test_bad_label_lists_are_refused(model, tmp_path, spec, words):
    code, _, err = run_main(["sample", "--engine", model, "--labels", spec, "--out", tmp_path / "g.png", *FAST])
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------------------------------- npz
def _npz_with_zeros(path: Path, nbytes: int) -> None:
    """An npz whose one member is ``nbytes`` of zeros, deflated (a few hundred KB per 100 MB), written streaming."""
    hdr = {"descr": "|u1", "fortran_order": False, "shape": (nbytes,)}
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, hdr)
            left = nbytes
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))


def test_npz_member_sizes_checked_before_inflating(tmp_path):
    from ditdeploy.errors import ArtifactError
    from ditdeploy.system.bounds import check_npz

    p = tmp_path / "bomb.npz"
    _npz_with_zeros(p, 256 << 20)
    assert p.stat().st_size < 2 << 20  # 256 MiB of data in a file under 2 MiB
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError) as e:
        check_npz(p, max_bytes=64 << 20)
    assert time.perf_counter() - t0 < 1.0  # refused from the headers, nothing inflated
    assert "256.0 MiB" in str(e.value) and "\n" not in str(e.value)
    assert check_npz(p, max_bytes=512 << 20) == {"arr_0": (256 << 20,)}


def test_npz_member_whose_header_disagrees_with_the_zip_is_refused(tmp_path):
    from ditdeploy.errors import ArtifactError
    from ditdeploy.system.bounds import check_npz

    p = tmp_path / "lie.npz"
    with zipfile.ZipFile(p, "w") as zf, zf.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 10**3)})
        f.write(b"\0" * 64)  # declares 8 TB, holds 64 bytes
    with pytest.raises(ArtifactError, match="damaged"):
        check_npz(p)
    code, _, err = run_main(["check", "--engine", ASSETS / "digits.onnx", "--golden", p, "--steps", "2"])
    assert_one_line_error(code, err, ("golden", "damaged"))


# --------------------------------------------------------------------------------------------------------- outputs
def test_calibrate_output_that_is_its_engine_is_refused(model):
    h = sha256_file(model)
    code, _, err = run_main(["calibrate", "--engine", model, "--out", model, "--samples", "2", "--steps", "2"])
    assert_one_line_error(code, err, ("input",), strict=False)
    assert sha256_file(model) == h


def test_check_json_that_is_its_engine_is_refused(model):
    h = sha256_file(model)
    code, _, err = run_main(["check", "--engine", model, "--json", model.with_name("digits.onnx.json"),
                             "--golden", model, "--steps", "2"])
    assert_one_line_error(code, err, ("input",))
    assert sha256_file(model) == h


def test_calibrate_count_is_bounded_before_sampling(model, tmp_path):
    t0 = time.perf_counter()
    code, _, err = run_main(["calibrate", "--engine", model, "--out", tmp_path / "c.npz", "--samples", "2000000000",
                             "--steps", "50", "--timesteps", "25"])
    assert_one_line_error(code, err, ("memory", "--samples"), strict=False)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "c.npz").exists()


# --------------------------------------------------------------------------------------------------------- graph
def _edit_config(model: Path, **changes) -> None:
    import json

    mp = model.with_name(model.name + ".json")
    m = json.loads(mp.read_text())
    m["config"].update(changes)
    mp.write_text(json.dumps(m))


@pytest.mark.parametrize("changes,word", [({"num_classes": 9}, "num_classes"), ({"num_classes": 11}, "num_classes"),
                                          ({"patch_size": 4}, "patch_size"), ({"hidden_size": 64}, "hidden_size"),
                                          ({"class_dropout_prob": 0.0}, "num_classes")])
def test_manifest_config_the_graph_contradicts_is_refused(model, tmp_path, changes, word):
    """The label embedding table has 11 rows (10 classes + the null class): a manifest saying otherwise would sample
    wrong classes (or guide against a real class) with exit 0."""
    _edit_config(model, **changes)
    code, _, err = run_main(["sample", "--engine", model, "--out", tmp_path / "g.png", *FAST])
    assert_one_line_error(code, err, (word, "graph"))
    assert not (tmp_path / "g.png").exists()


def _with_external_data(model: Path, listed: bool) -> Path:
    import json

    import onnx

    from ditdeploy.artifact.files import sha256_file

    m = onnx.load(str(model))
    ext = model.with_name("ext.onnx")
    onnx.save_model(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=1024)
    man = json.loads(model.with_name(model.name + ".json").read_text())
    man["artifact"] = ext.name
    man["files"] = {ext.name: {"sha256": sha256_file(ext), "bytes": ext.stat().st_size}}
    if listed:
        w = ext.with_name("w.bin")
        man["files"]["w.bin"] = {"sha256": sha256_file(w), "bytes": w.stat().st_size}
    ext.with_name(ext.name + ".json").write_text(json.dumps(man))
    return ext


def test_external_data_the_manifest_does_not_list_is_refused(model, tmp_path):
    pytest.importorskip("onnx")
    ext = _with_external_data(model, listed=False)
    code, _, err = run_main(["sample", "--engine", ext, "--out", tmp_path / "g.png", *FAST])
    assert_one_line_error(code, err, ("w.bin", "does not list"))
    ext = _with_external_data(model, listed=True)
    code, _, err = run_main(["sample", "--engine", ext, "--out", tmp_path / "g.png", *FAST])
    assert code == 0, err
    ext.with_name("w.bin").write_bytes(ext.with_name("w.bin").read_bytes()[:-4] + b"\0\0\0\1")  # now verified
    code, _, err = run_main(["sample", "--engine", ext, "--out", tmp_path / "g2.png", *FAST])
    assert_one_line_error(code, err, ("sha256", "w.bin"))


# --------------------------------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A tiny calibration set of the shipped digits model, made by the CLI."""
    d = tmp_path_factory.mktemp("calib")
    out = d / "calib.npz"
    code, _, err = run_main(["calibrate", "--engine", ASSETS / "digits.onnx", "--out", out, "--samples", "2",
                             "--steps", "2", "--timesteps", "2", "--val-samples", "0", "--batch-size", "2"])
    assert code == 0, err
    return out


def _damaged(calib: Path, d: Path, fn) -> Path:
    from conftest import copy_artifact, rehash

    p = copy_artifact(calib, d)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    with open(p, "wb") as f:
        np.savez(f, **arrays)
    rehash(p)
    return p


@pytest.mark.parametrize("case,fn,words", [
    ("t-out-of-range", lambda a: a["t"].__setitem__(0, 1500), ("0..999",)),
    ("t-negative", lambda a: a["t"].__setitem__(0, -1), ("0..999",)),
    ("y-beyond-null", lambda a: a["y"].__setitem__(0, 11), ("labels", "0..10")),
    ("t-float", lambda a: a.__setitem__("t", a["t"].astype(np.float32)), ("non-integer timesteps",)),
    ("x-int", lambda a: a.__setitem__("x", a["x"].astype(np.int32)), ("non-float",)),
    ("x-shape", lambda a: a.__setitem__("x", np.zeros((len(a["t"]), 1, 4, 4), np.float32)), ("shape",)),
    ("empty", lambda a: [a.__setitem__(k, a[k][:0]) for k in ("x", "t", "y", "step", "sample")], ("no inputs",)),
])
def test_calibration_set_checked_against_the_model_before_export(calib, tmp_path, case, fn, words):
    p = _damaged(calib, tmp_path / "in", fn)
    t0 = time.perf_counter()
    code, _, err = run_main(["export", "--checkpoint", ASSETS / "digits.safetensors", "--precision", "int8",
                             "--calibration", p, "--out", tmp_path / "o" / "q.onnx", "--no-verify"])
    line = assert_one_line_error(code, err, ("calibration set", p.name, *words), strict=False)
    assert "at fault" in line or "recapture" in line
    assert "[E:onnxruntime" not in err and not (tmp_path / "o" / "q.onnx").exists()
    assert time.perf_counter() - t0 < 60  # before the export work


@pytest.mark.parametrize("cmd", ["sample", "calibrate", "bench"])
def test_absurd_thread_count_is_refused_before_any_work(model, tmp_path, cmd):
    args = {"sample": ["--out", tmp_path / "g.png", *FAST],
            "calibrate": ["--out", tmp_path / "c.npz", "--samples", "2", "--steps", "2"],
            "bench": ["--no-torch", "--no-probe", "--steps", "1", "--repeats", "1", "--batch", "1"]}[cmd]
    t0 = time.perf_counter()
    code, _, err = run_main([cmd, "--engine", model, "--threads", "100000", *args])
    from ditdeploy.system.bounds import max_threads

    assert_one_line_error(code, err, ("--threads", str(max_threads())), strict=False)
    assert time.perf_counter() - t0 < 30 and list(tmp_path.glob("[gc].*")) == []


def test_train_export_ema_over_its_resume_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "0000010.pt"
    ck.write_bytes(b"checkpoint bytes")
    code, _, err = run_main(["train", "--preset", "digits", "--steps", "1", "--out", tmp_path / "run", "--resume", ck,
                             "--export-ema", ck])
    assert_one_line_error(code, err, ("--export-ema", "input"))
    assert ck.read_bytes() == b"checkpoint bytes"


RUN_OUT_OF_RANGE = """
import numpy as np, sys
from ditdeploy.runtimes import load
den = load(sys.argv[1])
x = np.zeros((1, 1, 8, 8), np.float32)
try:
    den(x, np.array([10]), np.array([50]))  # class 50 of a 10-class model: ONNX Runtime's Gather fails
except Exception as e:
    print("raised", type(e).__name__)
"""


def test_runtime_log_lines_stay_off_stderr(model):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", RUN_OUT_OF_RANGE, str(model)], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in __import__("os").environ.items() if k != "DITDEPLOY_DEBUG"})
    assert "raised" in r.stdout, r.stderr[-2000:]
    assert "[E:onnxruntime" not in r.stderr and "[W:onnxruntime" not in r.stderr, r.stderr[-2000:]
