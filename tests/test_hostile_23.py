"""Issue #23, items 2-7: the inputs, bounds, values and messages that still slipped through a hostile pass. One test
(or one parametrised test) per case; each failed on main before the fix (exit 0 with a destroyed input or a wrong
result, a raw exception, a traceback or library text on stderr, NaN in JSON, a temp folder left behind) and now gives
one ``error:`` line with nothing written. Real files and the real CLI; the shipped digits artifact; no export work runs
unless the case is about an export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    KILL_BEFORE_RENAME,
    assert_one_line_error,
    edit_manifest,
    rehash,
    run_main,
    shipped_digits_copy,
)

FAST = ["--labels", "1", "--steps", "2", "--no-progress"]


@pytest.fixture
def digits(tmp_path) -> Path:
    return shipped_digits_copy(tmp_path)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _external_copy(digits: Path, listed: bool) -> Path:
    """The digits ONNX re-saved with its weights in ``ext.weights`` beside it; the manifest lists that file or not
    (an unlisted one is what an attacker adds: it is never sha256-checked)."""
    import onnx

    m = onnx.load(str(digits))
    out = digits.with_name("ext.onnx")
    onnx.save(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    shutil.copyfile(digits.with_name(digits.name + ".json"), out.with_name(out.name + ".json"))
    edit_manifest(out, lambda mf: mf.update(artifact=out.name))
    rehash(out, [out, out.with_name("ext.weights")] if listed else [out])
    return out


# ------------------------------------------------------------------------------------------ 2. one rule for inputs
def test_unlisted_external_data_is_an_input(digits):
    """sample --npz onto the external data an ONNX references (not in its manifest) overwrote the weights, exit 0."""
    ext = _external_copy(digits, listed=False)
    data = ext.with_name("ext.weights")
    before = _sha(data)
    code, _, err = run_main(["sample", "-e", ext, "-b", "openvino", "--npz", data, "--out", digits.parent / "g.png",
                             *FAST])
    assert_one_line_error(code, err, ["--npz", "external data", "input"])
    assert _sha(data) == before and not (digits.parent / "g.png").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_backend_refuses_unlisted_external_data(digits, backend):
    """OpenVINO read external data its manifest does not list: tampered weights gave other images with exit 0.
    ONNX Runtime refused already; both now give the same one line."""
    ext = _external_copy(digits, listed=False)
    data = ext.with_name("ext.weights")
    raw = bytearray(data.read_bytes())
    raw[1000:1004] = b"\x00\x00\x80\x7f"  # one weight -> +inf: the tampering the sha256 check would have caught
    data.write_bytes(bytes(raw))
    code, _, err = run_main(["sample", "-e", ext, "-b", backend, "--out", digits.parent / "g.png", *FAST])
    assert_one_line_error(code, err, ["ext.weights", "does not list"])
    assert not (digits.parent / "g.png").exists()


def test_listed_external_data_runs_on_openvino_like_inline_weights(digits, tmp_path):
    """The same weights listed in the manifest load on OpenVINO and give the inline model's images exactly."""
    ext = _external_copy(digits, listed=True)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run_main(["sample", "-e", digits, "-b", "openvino", "--npz", a, "--out", tmp_path / "a.png", *FAST])[0] == 0
    assert run_main(["sample", "-e", ext, "-b", "openvino", "--npz", b, "--out", tmp_path / "b.png", *FAST])[0] == 0
    with np.load(a) as za, np.load(b) as zb:
        assert np.array_equal(za["arr_0"], zb["arr_0"])


@pytest.mark.parametrize("sidecar", ["decoder", "light graph"])
def test_sidecars_a_manifest_names_are_inputs(digits, sidecar):
    """A decoder / light graph the manifest names is read with the artifact: naming it as an output was allowed."""
    side = digits.with_name("side.onnx")
    side.write_bytes(b"sidecar bytes")
    if sidecar == "decoder":
        edit_manifest(digits, lambda m: m.update(decoder=side.name))
    else:
        edit_manifest(digits, lambda m: m.update(cache_graphs={"light": side.name, "export_id": "x"}))
    code, _, err = run_main(["check", "-e", digits, "--json", side, "--steps", "2", "--no-progress"])
    assert_one_line_error(code, err, ["--json", sidecar, "input"])
    assert side.read_bytes() == b"sidecar bytes"


def test_timing_cache_is_an_input(tmp_path):
    """export --fmt trt --dry-run wrote its build plan over the --timing-cache it reads (exit 0)."""
    cache = tmp_path / "m.buildplan.json"
    cache.write_bytes(b"timing cache bytes")
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "trt", "--dry-run", "--timing-cache", cache,
                             "--out", tmp_path / "m.plan", "--no-progress"])
    assert_one_line_error(code, err, ["--timing-cache", "input"])
    assert cache.read_bytes() == b"timing cache bytes"


def test_check_inception_weights_are_an_input(digits):
    """check --json onto the --inception weights it would read was not refused."""
    inc = digits.with_name("pt_inception.pth")
    inc.write_bytes(b"weights")
    code, _, err = run_main(["check", "-e", digits, "--fid-ref", "digits", "--inception", inc, "--json", inc])
    assert_one_line_error(code, err, ["--json", "--inception", "input"])
    assert inc.read_bytes() == b"weights"


# ------------------------------------------------------------------------------------- 3. bounds before the work
@pytest.mark.parametrize("cmd", [
    ["check", "--batch-size", "1000000000", "--steps", "2"],
    ["bench", "--batch-sizes", "1,1000000000", "--steps", "1", "--no-probe", "--no-torch"],
])
def test_batch_flags_are_bounded_before_any_work(digits, cmd):
    """check --batch-size / bench --batch-sizes 10^9 ended in numpy's MemoryError text (bench: per backend)."""
    code, _, err = run_main([cmd[0], "-e", digits, *cmd[1:], "--no-progress"])
    assert_one_line_error(code, err, [cmd[1], "1000000000", "1..4096"])


def test_trt_max_batch_is_bounded_before_the_export(tmp_path):
    """export --fmt trt --dry-run --max-batch 10^9 was refused only after the ONNX export. Now before the model is
    built: a --checkpoint that does not exist is never looked at."""
    code, _, err = run_main(["export", "--checkpoint", tmp_path / "absent.safetensors", "--fmt", "trt", "--dry-run",
                             "--max-batch", "1000000000", "--out", tmp_path / "m.plan", "--no-progress"])
    assert_one_line_error(code, err, ["--max-batch", "1..4096"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["non-empty", "file", "symlink", "under a file", "inside the source"])
def test_diffusers_out_is_checked_before_the_model_is_built(tmp_path, case):
    """--fmt diffusers --out: a non-empty folder / a file was refused only after the model was built; a symlink or a
    path below a file ended in NotADirectoryError / FileExistsError. The --checkpoint (absent) is never read."""
    src = tmp_path / "src"
    src.mkdir()
    out = {"non-empty": tmp_path / "full", "file": tmp_path / "f", "symlink": tmp_path / "link",
           "under a file": tmp_path / "f" / "snap", "inside the source": src / "snap"}[case]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_bytes(b"keep")
    (tmp_path / "f").write_bytes(b"file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    ck = src if case == "inside the source" else tmp_path / "absent.safetensors"
    code, _, err = run_main(["export", "--checkpoint", ck, "--fmt", "diffusers", "--out", out, "--no-progress"])
    assert_one_line_error(code, err, ["--out", {"non-empty": "not empty", "file": "not a folder",
                                                "symlink": "symbolic link", "under a file": "is a file",
                                                "inside the source": "input"}[case]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "full", "link", "src"]
    assert (tmp_path / "f").read_bytes() == b"file" and not (tmp_path / "elsewhere").exists()


def _write_npz_member(zf, name: str, header_shape: tuple, dtype: str, data_chunks) -> None:
    """Write ``name.npy`` into an open ZipFile, streaming its data (no full array in memory)."""
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": header_shape})
        for chunk in data_chunks:
            f.write(chunk)


def test_fid_precision_recall_memory_is_bounded_from_the_headers(tmp_path):
    """8M digit-sized samples (a 0.5 MB deflated npz): precision/recall would keep 8M x 2048 float32 features
    (~64 GiB) and started streaming; now the headers' counts are checked against the memory first."""
    import zipfile

    n = 8_000_000
    samples = tmp_path / "s.npz"
    block = bytes(64 * 100_000)
    with zipfile.ZipFile(samples, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        _write_npz_member(zf, "arr_0", (n, 8, 8, 1), "|u1", (block for _ in range(n // 100_000)))
    code, _, err = run_main(["fid", samples, "--ref", "digits", "--no-progress"])
    assert_one_line_error(code, err, ["precision/recall", "memory", "--no-pr"])


def _digits_samples(path: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    return path


def test_fid_reference_header_cannot_declare_a_huge_sigma(tmp_path):
    """A reference npz whose sigma header declares 10^6 x 10^6 float64 (8 TB) in a few bytes went to np.load."""
    import zipfile

    ref = tmp_path / "ref.npz"
    with zipfile.ZipFile(ref, "w") as zf:
        _write_npz_member(zf, "mu", (64,), "<f8", [bytes(64 * 8)])
        _write_npz_member(zf, "sigma", (10**6, 10**6), "<f8", [bytes(64)])
    code, _, err = run_main(["fid", _digits_samples(tmp_path / "s.npz"), "--ref", ref, "--extractor", "digits",
                             "--no-progress"])
    assert_one_line_error(code, err, ["sigma", "damaged"])


# ----------------------------------------------------------------------------- 4. values validated in the reader
@pytest.mark.parametrize("bad", ["negative", "not symmetric", "complex", "non-finite"])
def test_fid_reference_covariance_is_validated(tmp_path, bad):
    """A reference whose sigma is negative definite gave a negative FID with exit 0 (complex: numpy's ComplexWarning
    and a wrong value)."""
    d = 64
    rng = np.random.default_rng(1)
    a = rng.normal(size=(d, d))
    sigma = {"negative": -(a @ a.T) - np.eye(d), "not symmetric": a @ a.T + np.triu(np.ones((d, d))),
             "complex": (a @ a.T).astype(np.complex128) * (1 + 1j), "non-finite": a @ a.T}[bad]
    if bad == "non-finite":
        sigma[3, 5] = np.inf
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(d), sigma=sigma)
    code, _, err = run_main(["fid", _digits_samples(tmp_path / "s.npz"), "--ref", ref, "--extractor", "digits",
                             "--no-progress"])
    assert_one_line_error(code, err, ["covariance", {"negative": "negative eigenvalue", "not symmetric": "symmetric",
                                                     "complex": "not real", "non-finite": "nan or inf"}[bad]])


def test_fid_reference_with_a_valid_covariance_still_scores(tmp_path):
    """The checks accept a real covariance: FID against (mu, sigma) of the samples' own features is ~0."""
    from ditdeploy.fid.digits import digits_extractor

    s = _digits_samples(tmp_path / "s.npz", 200)
    with np.load(s) as z:
        f = digits_extractor()(z["arr_0"]).pool
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    code, out, err = run_main(["fid", s, "--ref", ref, "--extractor", "digits", "--no-pr", "--no-progress",
                               "--json", tmp_path / "r.json"])
    assert code == 0, err
    fid = json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"]
    # float64 statistics of the same rows: only round-off remains, relative to the covariance's trace (the size of
    # the terms that cancel); a negative-definite or mis-read sigma would be off by O(trace)
    assert abs(fid) < 1e-6 * float(np.trace(np.cov(f, rowvar=False)))


@pytest.mark.parametrize("table,why", [({"-1": "cat", "0": "dog"}, "class -1"), ({"1": "a", "01": "b"}, "twice")])
def test_id2label_ids_in_range_and_unique(table, why):
    """A negative id published an artifact that could never sample; "1" and "01" dropped one name silently."""
    from ditdeploy.config.labels import normalize
    from ditdeploy.errors import DitDeployError

    with pytest.raises(DitDeployError, match=why):
        normalize(table)
    assert normalize({"0": "a", "1": "a"}) == {0: "a", 1: "a"}  # one name for two classes stays (ImageNet "crane")


def _snapshot_with(tmp_path: Path, config: dict | None = None, id2label: dict | None = None) -> Path:
    from diffusers_snapshots import save_snapshot, tiny_transformer

    snap = save_snapshot(tmp_path / "snap", tiny_transformer(), vae=None, id2label=id2label or {0: "a"})
    if config:
        p = snap / "transformer" / "config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **config}))
    return snap


@pytest.mark.parametrize("config,words", [
    ({"patch_size": 0}, ["patch_size", "got 0"]),
    ({"sample_size": -8}, ["input_size", "got -8"]),
    ({"num_attention_heads": 1000000, "attention_head_dim": 1000000}, ["hidden_size", "1000000000000"]),
    ({"num_layers": 1000000}, ["memory", "parameters"]),
])
def test_snapshot_config_dims_are_validated_before_allocation(tmp_path, config, words):
    """patch_size 0 raised ZeroDivisionError; huge dims allocated the sin-cos table before any shape check."""
    snap = _snapshot_with(tmp_path, config)
    code, _, err = run_main(["export", "--checkpoint", snap, "--fmt", "diffusers", "--out", tmp_path / "o",
                             "--no-progress"])
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "o").exists()


def test_snapshot_negative_id2label_is_refused_at_read(tmp_path):
    snap = _snapshot_with(tmp_path, id2label={-1: "x", 0: "a"})
    code, _, err = run_main(["export", "--checkpoint", snap, "--fmt", "diffusers", "--out", tmp_path / "o",
                             "--no-progress"])
    assert_one_line_error(code, err, ["id2label", "class -1"])
    assert not (tmp_path / "o").exists()


def _graph_file(path: Path, kind: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    if kind == "empty":
        path.write_bytes(b"")
        return path
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])
    if kind == "cycle":
        nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    else:  # an input nothing provides
        nodes = [helper.make_node("Add", ["x", "ghost"], ["b"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("kind,words", [("empty", ["no graph nodes"]), ("cycle", ["cycle"]),
                                        ("undefined", ["ghost", "no node"])])
def test_trt_lint_needs_a_parseable_acyclic_graph(tmp_path, kind, words):
    """check --trt-lint said PASS (exit 0) for an empty file and for a graph with a cycle."""
    code, out, err = run_main(["check", "--trt-lint", _graph_file(tmp_path / "m.onnx", kind)])
    assert_one_line_error(code, err, words)
    assert "PASS" not in out


# Every reader fed garbage: one ``error:`` line of ours (exit 2), no traceback, no raw exception name.
DEEP = "[" * 100_000 + "]" * 100_000


def _garbage(tmp_path: Path, reader: str) -> list:
    a = shipped_digits_copy(tmp_path)
    man = a.with_name(a.name + ".json")
    sample = ["sample", "-e", a, *FAST, "--out", tmp_path / "o.png"]
    if reader == "manifest nested too deep":
        man.write_text(DEEP)
    elif reader == "manifest NUL in a file name":
        edit_manifest(a, lambda m: m["files"].update({"a\x00b": {"sha256": "0"}}))
    elif reader == "manifest field of the wrong type":
        edit_manifest(a, lambda m: m.update(decoder=5))  # a number where a file name belongs
    elif reader == "manifest config of the wrong type":
        edit_manifest(a, lambda m: m["config"].update(hidden_size="128"))
    elif reader == "manifest batch not positive":
        edit_manifest(a, lambda m: m.update(batch={"max": -5}))
    elif reader == "safetensors config nested too deep":
        import torch
        from safetensors.torch import save_file

        f = tmp_path / "x.safetensors"
        save_file({"a": torch.zeros(2)}, str(f), metadata={"config": DEEP})
        return ["sample", "-e", f, *FAST, "--out", tmp_path / "o.png"]
    elif reader in ("snapshot config nested too deep", "VAE config nested too deep", "VAE config of zero channels"):
        d = tmp_path / "vae"
        d.mkdir()
        txt = DEEP if "deep" in reader else json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [0, 8]})
        (d / "config.json").write_text(txt)
        if reader.startswith("snapshot"):
            (d / "model_index.json").write_text("{}")
            return ["export", "--checkpoint", tmp_path, "--fmt", "diffusers", "--out", tmp_path / "o"]
        return ["export", "--vae", d, "--out", tmp_path / "dec.onnx"]
    elif reader == "fid samples with a lying header":
        import zipfile

        f = tmp_path / "s.npz"
        with zipfile.ZipFile(f, "w") as zf:
            _write_npz_member(zf, "arr_0", (10**12, 8, 8, 1), "|u1", [bytes(640)])
        return ["fid", f, "--ref", "digits", "--no-progress"]
    return sample


READERS = ["manifest nested too deep", "manifest NUL in a file name", "manifest field of the wrong type",
           "manifest config of the wrong type", "manifest batch not positive", "safetensors config nested too deep",
           "snapshot config nested too deep", "VAE config nested too deep", "VAE config of zero channels",
           "fid samples with a lying header"]


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_fed_garbage_gives_one_line(tmp_path, reader):
    code, _, err = run_main(_garbage(tmp_path, reader))
    line = assert_one_line_error(code, err, [])
    assert code == 2 and "--debug" not in line, line  # ours, not "RecursionError: ... (run with --debug ...)"
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------- 5/6. no chatter, strict JSON, the late interrupt
REPO = Path(__file__).resolve().parents[1]


def test_no_library_chatter_on_stderr(tmp_path):
    """export --vae DIR printed diffusers' "accelerate" notice (5 lines) and two UserWarnings with source lines; now
    stderr holds our own lines only."""
    from diffusers_snapshots import tiny_vae

    vae = tmp_path / "vae"
    tiny_vae().save_pretrained(str(vae))
    # a real process: in-process, pytest captures warnings and diffusers' logger writes to the stderr of its import
    r = subprocess.run([sys.executable, "-m", "ditdeploy", "export", "--vae", str(vae), "--out",
                        str(tmp_path / "dec.onnx"), "--no-verify", "--no-progress"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    err = r.stderr
    assert r.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all(ln.startswith(("warning:", "note:")) for ln in lines), err
    assert "accelerate" not in err and "UserWarning" not in err


def _summary_keys(d: object, prefix: str = "") -> set[str]:
    if not isinstance(d, dict):
        return set()
    return {prefix + k for k in d} | {x for k, v in d.items() for x in _summary_keys(v, prefix + k + ".")}


def _strict_load(p: Path) -> dict:
    def no_constant(c: str):
        raise AssertionError(f"{p.name} is not strict JSON: {c}")

    return json.loads(p.read_text(), parse_constant=no_constant)


def test_sharded_json_summary_is_strict_and_shaped_like_the_unsharded_one(digits, tmp_path):
    """sample --shards 2 --json wrote "scale": NaN (not JSON) and an empty "denoiser" table."""
    args = ["sample", "-e", digits, "--labels", "1,2", "--steps", "2", "--no-progress"]
    assert run_main([*args, "--json", tmp_path / "u.json", "--out", tmp_path / "u.png"])[0] == 0
    code, _, err = run_main([*args, "--shards", "2", "--json", tmp_path / "s.json", "--out", tmp_path / "s.png"])
    assert code == 0, err
    u, s = _strict_load(tmp_path / "u.json"), _strict_load(tmp_path / "s.json")
    assert _summary_keys(s) == _summary_keys(u)
    assert s["guidance"]["scale"] == u["guidance"]["scale"] == 4.0
    assert s["backend"] == u["backend"] and s["images"] == u["images"] == 2
    # the same images: the same rows and GMACs over the two shards (each shard makes its own calls)
    for key in ("rows", "gmac", "light_rows"):
        assert s["denoiser"][key] == u["denoiser"][key], key
    assert s["denoiser"]["calls"] == 2 * u["denoiser"]["calls"]


def test_json_text_never_writes_nan():
    from ditdeploy.artifact.files import json_text

    assert json.loads(json_text({"a": float("nan"), "b": [float("inf"), np.float32("nan"), 1.5],
                                 "c": np.array([1.0, -np.inf])})) == {"a": None, "b": [None, None, 1.5],
                                                                      "c": [1.0, None]}


SIGINT_AFTER_RENAME = """
import os, signal, sys
target = os.path.abspath(sys.argv[1])
_replace = os.replace
def _replace_then_interrupt(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    if os.path.abspath(dst) == target:
        os.kill(os.getpid(), signal.SIGINT)
os.replace = _replace_then_interrupt
from ditdeploy.cli import main
main(sys.argv[2:])
"""

def _export_snapshot_child(script: str, out: Path) -> subprocess.CompletedProcess:
    args = ["export", "--model", "digits", "--fmt", "diffusers", "--no-verify", "--out", str(out), "--no-progress"]
    env = {**os.environ, "DITDEPLOY_NO_PROGRESS": "1"}
    # a background shell starts children with SIGINT ignored (and ditdeploy keeps an ignored signal ignored):
    # restore the default so the child's SIGINT is delivered however the suite was started
    return subprocess.run([sys.executable, "-c", script, str(out), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_late_interrupt_reports_what_was_written(tmp_path):
    """A SIGINT right after the snapshot was renamed into place: exit 130 and one line that says the snapshot is
    complete (was: nothing said what had been written)."""
    out = tmp_path / "snap"
    r = _export_snapshot_child(SIGINT_AFTER_RENAME, out)
    assert r.returncode == 130, r.stderr[-2000:]
    line = assert_one_line_error(r.returncode, r.stderr, ["interrupted", "written", str(out)], strict=False)
    assert line.startswith("error:")
    assert (out / "ditdeploy_manifest.json").is_file() and (out / "transformer" / "config.json").is_file()


# --------------------------------------------------------------------------------- 7. temp folders tagged, cleaned
def test_killed_diffusers_export_leaves_a_tagged_folder_the_next_run_removes(tmp_path):
    """A killed --fmt diffusers export left .NAME.xxxx/ with the weights, which no later run recognised."""
    from ditdeploy.artifact.files import TEMP_TAG

    r = _export_snapshot_child(KILL_BEFORE_RENAME, tmp_path / "snap")
    assert r.returncode == -9, r.stderr[-2000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{TEMP_TAG}-"), left
    assert any((tmp_path / left[0]).rglob("*.safetensors"))  # the weights were left behind
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "diffusers", "--no-verify", "--out",
                             tmp_path / "again", "--no-progress"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    assert "removed 1 temporary file" in err and left[0] in err


def test_temp_dir_is_pid_tagged_and_cleans_a_dead_runs_leftover(tmp_path):
    """The scratch folders of export (OpenVINO/VAE staging), fid's paired sampling and INT8 quantization were named
    without a pid (``.ditdeploy-export-xxxx``): a killed run's folder stayed forever. ``temp_dir`` names them with the
    pid and removes a dead process's folder the next time one is made there."""
    from ditdeploy.artifact.files import TEMP_TAG, temp_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".{TEMP_TAG}-export-{int(dead.stdout)}-abcdefgh"
    left.mkdir()
    (left / "weights.bin").write_bytes(b"w")
    with temp_dir(tmp_path, "export") as d:
        assert d.name.startswith(f".{TEMP_TAG}-export-{os.getpid()}-") and d.is_dir()
        assert not left.exists()
    assert list(tmp_path.iterdir()) == []
