"""Untrusted files (issue 8): manifest paths cannot escape their folder, hashes are enforced, symlinks are not
followed out of a folder or through an output path, npz files never unpickle, and the code base only ever reads
pickles through ``torch.load(weights_only=True)``.

(The malicious-pickle checkpoints themselves are in tests/test_checkpoints.py and tests/test_training_loop.py; the
CLI-level refusals of them are in tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import ast
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, copy_artifact, edit_manifest, run_main

from ditdeploy.artifact.files import atomic_path, manifest_path, safe_member, sha256_file, write_json_atomic
from ditdeploy.artifact.manifest import load_manifest, make_manifest
from ditdeploy.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ditdeploy", "export", "runtimes", "calibration", "bench")


# --------------------------------------------------------------------------------------------------------- safe_member
@pytest.mark.parametrize("name", ["../x.onnx", "a/../../x.onnx", "sub/../../../etc/passwd", "..", "/etc/passwd",
                                  "/tmp/x.onnx.data", "", "x\x00.onnx"])
def test_safe_member_refuses_escaping_names(tmp_path, name):
    base = tmp_path / "art"
    base.mkdir()
    with pytest.raises(ArtifactError) as e:
        safe_member(base, name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["m.onnx.data", "sub/m.bin", "./m.onnx", "sub/../m.onnx"])
def test_safe_member_accepts_names_inside(tmp_path, name):
    base = tmp_path / "art"
    (base / "sub").mkdir(parents=True)
    p = safe_member(base, name)
    assert base.resolve() in p.parents


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    base = tmp_path / "art"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (base / "file-link").symlink_to(outside / "secret")
    (base / "dir-link").symlink_to(outside, target_is_directory=True)
    (base / "inner").write_text("y")
    (base / "inner-link").symlink_to(base / "inner")
    for name in ("file-link", "dir-link/secret"):
        with pytest.raises(ArtifactError, match="outside its directory"):
            safe_member(base, name)
    assert safe_member(base, "inner-link") == (base / "inner").resolve()  # a link that stays inside is fine


# --------------------------------------------------------------------------------------------------------- manifests
def _artifact(tmp_path: Path, payload: bytes = b"model bytes") -> Path:
    a = tmp_path / "m.onnx"
    a.write_bytes(payload)
    write_json_atomic(manifest_path(a), make_manifest(a, [a], kind="denoiser"))
    return a


def test_manifest_sha256_is_enforced(tmp_path):
    a = _artifact(tmp_path)
    assert load_manifest(a)["files"]["m.onnx"]["sha256"] == sha256_file(a)
    a.write_bytes(b"model bytez")  # same size, other content
    with pytest.raises(ArtifactError, match="sha256 mismatch for m.onnx"):
        load_manifest(a)


@pytest.mark.parametrize("files", [{}, [], None, {"other.onnx": {"sha256": "0" * 64}}])
def test_manifest_must_list_the_artifact(tmp_path, files):
    """Emptying (or retargeting) the files table must not switch verification off."""
    a = _artifact(tmp_path)
    m = json.loads(manifest_path(a).read_text())
    m["files"] = files
    manifest_path(a).write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_manifest(a)


def test_manifest_member_swapped_for_symlink_is_refused(tmp_path):
    """A listed data file replaced by a symlink to an outside file with the *recorded* hash is still refused."""
    art = tmp_path / "art"
    art.mkdir()
    a = art / "m.onnx"
    a.write_bytes(b"graph")
    data = art / "m.onnx.data"
    data.write_bytes(b"weights")
    write_json_atomic(manifest_path(a), make_manifest(a, [data, a], kind="denoiser"))
    load_manifest(a)
    outside = tmp_path / "weights-elsewhere"
    os.replace(data, outside)
    data.symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside its directory"):
        load_manifest(a)


def test_runtime_refuses_escaping_manifest_before_reading(digits_artifacts, tmp_path):
    """The loader checks member names before hashing: a '../' name pointing at a real, matching file is refused."""
    from ditdeploy.runtimes import load

    p = copy_artifact(digits_artifacts["onnx"], tmp_path / "a" / "b")
    victim = tmp_path / "a" / "victim.bin"
    victim.write_bytes(b"outside data")
    edit_manifest(p, lambda m: m["files"].update({"../victim.bin": {"sha256": sha256_file(victim)}}))
    with pytest.raises(ArtifactError, match="outside its directory"):
        load(p)


# --------------------------------------------------------------------------------------------------------- outputs
def test_output_symlink_is_replaced_not_followed(tmp_path):
    """A symlink planted at an output path is replaced by the new file; its target is never written."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    write_json_atomic(link, {"a": 1})
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}
    link2 = tmp_path / "out.bin"
    link2.symlink_to(victim)
    with atomic_path(link2) as tmp:
        tmp.write_bytes(b"new")
    assert victim.read_text() == "keep me" and link2.read_bytes() == b"new"


def test_cli_outputs_do_not_follow_planted_symlinks(digits_artifacts, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("grid.png", "calib.npz", "calib.npz.json"):
        (out / name).symlink_to(victim)
    code, _, err = run_main(["sample", "--engine", digits_artifacts["onnx"], "--labels", "1", "--steps", "2",
                             "--no-progress", "--out", out / "grid.png"])
    assert code == 0, err
    code, _, err = run_main(["calibrate", "--engine", digits_artifacts["onnx"], "--out", out / "calib.npz",
                             "--samples", "2", "--steps", "2", "--timesteps", "2", "--val-samples", "0"])
    assert code == 0, err
    assert victim.read_text() == "keep me"
    assert not any((out / n).is_symlink() for n in ("grid.png", "calib.npz", "calib.npz.json"))
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    load_manifest(out / "calib.npz")


# --------------------------------------------------------------------------------------------------------- npz
class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz_with_pickle(path: Path, marker: Path, **arrays: np.ndarray) -> None:
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(marker)
    with open(path, "wb") as f:
        np.savez(f, **arrays, evil=evil)


def test_calibration_npz_with_a_pickle_is_refused_without_running(digits_artifacts, tmp_path):
    from ditdeploy.calibration.capture import load_calibration

    marker = tmp_path / "PWNED"
    p = tmp_path / "calib.npz"
    n = 4
    arrays = {"x": np.zeros((n, 1, 8, 8), np.float32), "t": np.arange(n, dtype=np.int64),
              "y": np.zeros(n, np.int64), "step": np.zeros(n, np.int32), "sample": np.zeros(n, np.int32)}
    _npz_with_pickle(p, marker, **arrays)
    write_json_atomic(manifest_path(p), make_manifest(p, [p], kind="calibration", config={"in_channels": 1}))
    with pytest.raises(ArtifactError, match="not a readable calibration"):
        load_calibration(p)
    assert not marker.exists()


def test_golden_npz_with_a_pickle_is_refused_without_running(digits_artifacts, tmp_path):
    marker = tmp_path / "PWNED"
    g = tmp_path / "golden.npz"
    _npz_with_pickle(g, marker, meta=np.frombuffer(b"{}", np.uint8))
    code, _, err = run_main(["check", "--engine", digits_artifacts["onnx"], "--golden", g])
    assert_one_line_error(code, err, ("not a readable golden",))
    assert not marker.exists()


def test_sample_shard_parts_with_a_pickle_are_not_unpickled(tmp_path):
    """Sharded sampling merges .npz parts written by worker processes: a part whose image array is a pickled object
    is refused by np.load (pickles off), and the payload never runs."""
    from ditdeploy.run import shard_workers

    marker = tmp_path / "PWNED"
    final = tmp_path / "s.npz"
    part = shard_workers.part_path(final, 0, 1)
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(marker)
    with open(part, "wb") as f:
        np.savez(f, arr_0=evil, labels=np.zeros(1, np.int64), index=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):
        shard_workers.merge_parts(final, [part], 1)
    assert not marker.exists() and not final.exists()


# --------------------------------------------------------------------------------------------------------- checkpoints
def test_safetensors_with_a_lying_header_is_refused(tmp_path):
    """A header length of 1 TiB, or tensors claiming 40 GB of data in a 100-byte file: one-line refusal, no
    allocation of what the header claims."""
    from ditdeploy.sources.checkpoints import load_model

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": 1}')
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}})
    lie = tmp_path / "lie.safetensors"
    lie.write_bytes(struct.pack("<Q", len(hdr)) + hdr.encode() + b"\0" * 16)
    for p in (huge, lie):
        with pytest.raises(ArtifactError) as e:
            load_model(p)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------- code scan
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else f.id if isinstance(f, ast.Name) else None)
            if name:
                yield name, node


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return "<absent>"


def test_code_reads_pickles_only_safely():
    """Every torch.load passes weights_only=True (literally); no np.load allows pickles; no pickle/marshal/dill/
    joblib/yaml.load reads anywhere in the package (tests excluded: they build the malicious files)."""
    problems, seen_torch_load = [], 0
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, node in _calls(tree):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if name == "torch.load":
                    seen_torch_load += 1
                    if _kw(node, "weights_only") is not True:
                        problems.append(f"{where} torch.load without weights_only=True")
                elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in ("<absent>", False):
                    problems.append(f"{where} np.load with allow_pickle={_kw(node, 'allow_pickle')}")
                elif name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load",
                              "dill.loads", "joblib.load", "cloudpickle.load", "cloudpickle.loads", "shelve.open"):
                    problems.append(f"{where} {name}")
                elif name == "yaml.load" and _kw(node, "Loader") == "<absent>":
                    problems.append(f"{where} yaml.load without a safe Loader")
    assert not problems, problems
    assert seen_torch_load >= 2  # the scan sees the real call sites (checkpoints, training state)
