"""AOTInductor `.pt2` of the shipped digits model: export (CLI), runtime, sample, check, bad inputs.

One compile for the module (~1 min on 2 shared cores): the ``pt2`` fixture; every test copies it before damaging it.
The bf16 export is a second compile and marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, copy_artifact, edit_manifest, rehash, run_main

torch = pytest.importorskip("torch")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aoti") / "digits.pt2"
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "aoti", "--out", out])
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def reference():
    from ditdeploy.sources.checkpoints import load_model
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT

    return load_model(DIGITS_CHECKPOINT).eval()


def torch_out(model, x, t, y) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def test_manifest_records_package_and_parity(pt2: Path):
    from ditdeploy.artifact.files import sha256_file

    m = json.loads(pt2.with_name("digits.pt2.json").read_text())
    assert (m["format"], m["device"], m["precision"], m["kind"]) == ("aoti", "cpu", "fp32", "denoiser")
    assert m["torch"]["version"] == torch.__version__
    assert m["files"]["digits.pt2"]["sha256"] == sha256_file(pt2)
    assert m["config"]["variant"] == "digits" and m["batch"] == {"min": 1, "max": None}
    assert m["compile_seconds"] > 0 and m["peak_rss_bytes"] > 0
    p = m["parity"]
    assert [b["batch"] for b in p["batches"]] == [1, 3]  # the ONNX path's probes: batch 1 and 3
    ts = sorted(t for b in p["batches"] for t in b["t"])
    assert ts[0] == 0 and ts[-1] == 999  # both ends of the schedule
    assert 10 in [y for b in p["batches"] for y in b["y"]]  # the null class
    assert p["worst"]["rel_l2"] <= 1e-5 and p["batches"][0]["reference_rms"] > 0.1  # a trained, non-zero output


def test_runtime_matches_torch_on_new_batches(pt2: Path, reference):
    """Dynamic batch: sizes never seen at export, fresh inputs; fp32 goal rel-L2 <= 1e-5 vs eager torch."""
    from ditdeploy.runtimes import load

    den = load(pt2)
    assert den.name == "aoti:cpu:fp32"
    rng = np.random.default_rng(5)
    for n in (1, 2, 7):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        t = rng.integers(0, 1000, n)
        y = rng.integers(0, 11, n)
        got, ref = den(x, t, y), torch_out(reference, x, t, y)
        assert got.shape == ref.shape == (n, 2, 8, 8)
        assert rel_l2(got, ref) <= 1e-5


def test_min_batch_pads_and_drops_rows(tmp_path: Path, pt2: Path, reference):
    """A package whose batch range starts at 4 gets batch 1 padded to 4; the result is the unpadded row's."""
    from ditdeploy.runtimes import load

    p = copy_artifact(pt2, tmp_path)
    edit_manifest(p, lambda m: m["batch"].update(min=4))
    den = load(p)
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    t, y = np.array([500]), np.array([3])
    assert den.min_batch == 4
    assert rel_l2(den(x, t, y), torch_out(reference, x, t, y)) <= 1e-5


def test_sample_cli_matches_torch_backend(tmp_path: Path, pt2: Path):
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT

    args = ["--labels", "0,3,7", "--steps", "8", "--no-progress", "--no-out"]
    code, _, err = run_main(["sample", "--engine", pt2, "--npz", tmp_path / "a.npz", *args])
    assert code == 0, err
    assert "aoti:cpu:fp32" in err
    code, _, err = run_main(["sample", "--engine", DIGITS_CHECKPOINT, "--npz", tmp_path / "t.npz", *args])
    assert code == 0, err
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "t.npz")["arr_0"]
    assert a.shape == b.shape == (3, 8, 8, 1)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 images: at most a rounding step apart


def test_check_cli_passes_fp32(tmp_path: Path, pt2: Path):
    code, out, err = run_main(["check", "--engine", pt2, "--steps", "6", "--timesteps", "4",
                               "--json", tmp_path / "r.json"])
    assert code == 0, out + err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["precision"] == "fp32"
    assert max(c["rel_l2"] for c in rep["calls"]) <= 1e-5


# ------------------------------------------------------------------------------------------------- bad inputs
def test_other_torch_version_refused(tmp_path: Path, pt2: Path):
    p = copy_artifact(pt2, tmp_path)
    edit_manifest(p, lambda m: m["torch"].update(version="2.12.1+cpu"))
    code, _, err = run_main(["sample", "--engine", p, "--out", tmp_path / "s.png", "--no-progress"])
    assert_one_line_error(code, err, ["torch 2.12.1", "re-export"])
    assert not (tmp_path / "s.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_package_refused_on_cpu_machine(tmp_path: Path, pt2: Path):
    p = copy_artifact(pt2, tmp_path)
    edit_manifest(p, lambda m: m.update(device="cuda"))
    code, _, err = run_main(["check", "--engine", p, "--per-call-only"])
    assert_one_line_error(code, err, ["compiled for CUDA", "no CUDA device"])


def test_cpu_package_refused_on_cuda(tmp_path: Path, pt2: Path):
    code, _, err = run_main(["sample", "--engine", pt2, "--device", "cuda", "--out", tmp_path / "s.png"])
    assert_one_line_error(code, err, ["compiled for cpu", "cannot run on cuda"])
    assert not (tmp_path / "s.png").exists()


def test_truncated_package_refused(tmp_path: Path, pt2: Path):
    p = copy_artifact(pt2, tmp_path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    code, _, err = run_main(["sample", "--engine", p, "--out", tmp_path / "s.png"])
    assert_one_line_error(code, err, "sha256 mismatch")
    rehash(p)  # the hash now matches and the user trusts it: the truncated zip reaches the package checks
    code, _, err = run_main(["sample", "--engine", p, "--out", tmp_path / "s.png", "--trust-native-code"])
    assert_one_line_error(code, err, ["cannot load the AOTInductor package", "truncated"])
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("backend", ["aoti", "torch"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA machines --cuda-graph is valid")
def test_cuda_graph_on_cpu_is_one_line(tmp_path: Path, pt2: Path, backend: str):
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT

    engine = pt2 if backend == "aoti" else DIGITS_CHECKPOINT
    code, _, err = run_main(["sample", "--engine", engine, "--cuda-graph", "--out", tmp_path / "s.png"])
    assert_one_line_error(code, err, ["--cuda-graph", "CUDA device"])
    assert not (tmp_path / "s.png").exists()


def test_cuda_graph_flag_refused_for_onnxruntime(tmp_path: Path):
    code, _, err = run_main(["sample", "--cuda-graph", "--out", tmp_path / "s.png"])
    assert_one_line_error(code, err, ["--cuda-graph applies to", "not onnxruntime"])


def test_misspelt_backend_option(pt2: Path):
    from ditdeploy.errors import DitDeployError
    from ditdeploy.runtimes import load

    with pytest.raises(DitDeployError, match="unknown option"):
        load(pt2, cuda_graphs=True)


def test_package_metadata_checks():
    from ditdeploy.errors import ArtifactError
    from ditdeploy.runtimes.aoti import check_package_metadata

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    md = {"AOTI_DEVICE_KEY": "cpu", "AOTI_CPU_ISA": "AVX512 AVX512_VNNI"}
    check_package_metadata(md, Path("a.pt2"), cpu, "AVX512", None)
    with pytest.raises(ArtifactError, match="compiled for AVX512 CPUs; this CPU supports AVX2"):
        check_package_metadata(md, Path("a.pt2"), cpu, "AVX2", None)
    with pytest.raises(ArtifactError, match="do not belong together"):
        check_package_metadata(md, Path("a.pt2"), cuda, "AVX512", (9, 0))
    with pytest.raises(ArtifactError, match="compute capability 90; this GPU is 8.0"):
        check_package_metadata({"AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": "90"}, Path("a.pt2"), cuda,
                               "AVX512", (8, 0))


@pytest.mark.parametrize("extra,words", [
    (["--precision", "fp8"], ["fp8", "FP8 tensor cores"]),
    (["--precision", "int8"], ["--precision", "aoti"]),
    (["--device", "tpu"], ["--device", "cpu or cuda"]),
    (["--dry-run"], ["--dry-run", "--fmt trt"]),
    (["--min-batch", "4", "--max-batch", "2"], ["batch range 4..2", "--min-batch <= --max-batch"]),
])
def test_export_refusals_write_nothing(tmp_path: Path, extra: list[str], words: list[str]):
    if torch.cuda.is_available() and "fp8" in extra:
        pytest.skip("this machine has a GPU: fp8 may be possible")
    out = tmp_path / "x.pt2"
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "aoti", "--out", out, *extra])
    assert_one_line_error(code, err, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_export_cuda_on_cpu_machine(tmp_path: Path):
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "aoti", "--device", "cuda",
                             "--out", tmp_path / "x.pt2"])
    assert_one_line_error(code, err, ["--device cuda", "no CUDA device"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bf16_package_within_bf16_threshold(tmp_path: Path, reference):
    """bf16 on this AVX512-BF16 CPU: export parity within parity.tolerance_for('bf16'), and `check` passes at bf16 limits."""
    from ditdeploy.export.aoti import export_denoiser_aoti
    from ditdeploy.proof.parity import tolerance_for

    out = tmp_path / "digits-bf16.pt2"
    m = export_denoiser_aoti(reference, out, precision="bf16")
    w = m["parity"]["worst"]
    assert 1e-4 < w["rel_l2"] <= tolerance_for("bf16")["rel_l2"]  # really bf16 (not fp32), and within the limit
    code, out_, err = run_main(["check", "--engine", out, "--steps", "6", "--timesteps", "4"])
    assert code == 0, out_ + err


def test_bf16_cli_reaches_the_compile(tmp_path: Path, monkeypatch):
    """The CLI's pre-flight checks (output policy, size estimate) accept bf16: stop at the compile, nothing written."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.export import aoti

    def stop(*a, **k):
        raise DitDeployError("stopped before compiling (test)")

    monkeypatch.setattr(aoti, "compile_package", stop)
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "aoti", "--precision", "bf16",
                             "--out", tmp_path / "b.pt2"])
    assert_one_line_error(code, err, "stopped before compiling")
    assert list(tmp_path.iterdir()) == []


def test_packages_load_single_threaded(pt2: Path, monkeypatch):
    """Issue #21 defect 1: the runtime (``sample``/``check``/``bench``) and experiments/gpu_engines load a package
    with ``run_single_threaded=True`` -- a multi-threaded CUDA container queries the previous run's CUDA event, which
    is illegal during CUDA-graph capture. The real loader runs; a subclass only records its arguments."""
    from ditdeploy.runtimes import load
    from experiments.gpu_engines import load_aoti

    real = torch._C._aoti.AOTIModelPackageLoader
    calls = []

    class Recording(real):
        def __init__(self, *args):
            calls.append(args)
            super().__init__(*args)

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", Recording)
    x, t, y = np.zeros((2, 1, 8, 8), np.float32), np.array([5, 900]), np.array([1, 10])
    den = load(pt2)
    out = den(x, t, y)
    fn = load_aoti(pt2, torch.device("cpu"))
    with torch.inference_mode():
        out2 = fn(*(torch.from_numpy(a) for a in (x, t, y))).numpy()
    np.testing.assert_array_equal(out, out2)  # one loader, one result
    assert len(calls) == 2 and all(c[2] is True and c[3] == 1 for c in calls), calls  # single-threaded, 1 runner


# ------------------------------------------------------------------------------------------------- native code trust
def _retamper(src: Path, dest: Path, replace: dict | None = None, add: dict | None = None) -> Path:
    """A copy of the package with members replaced/added (every original member re-written, in order), its
    manifest's sha256 updated to match -- what an attacker who writes both files produces."""
    import zipfile

    out = copy_artifact(src, dest)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    rehash(out)
    return out


def test_package_built_elsewhere_needs_trust(tmp_path: Path, pt2: Path, private_trusted_list: Path, monkeypatch):
    """The export recorded its package in the trusted list; a package with other bytes (here: re-zipped with one
    extra member, manifest updated) is native code nobody trusted: one line, nothing written, until
    --trust-native-code; with the list off, even the installation's own package needs the flag."""
    from ditdeploy.artifact.files import sha256_file

    assert sha256_file(pt2) in private_trusted_list.read_text()
    foreign = _retamper(pt2, tmp_path / "f", add={"digits/extra.txt": b"hello"})
    code, _, err = run_main(["sample", "--engine", foreign, "--out", tmp_path / "s.png", "--no-progress"])
    assert_one_line_error(code, err, ["native code", "did not build", "--trust-native-code"])
    assert not (tmp_path / "s.png").exists()
    code, _, err = run_main(["sample", "--engine", foreign, "--out", tmp_path / "s.png", "--no-progress",
                             "--steps", "2", "--trust-native-code"])
    assert code == 0, err
    assert (tmp_path / "s.png").exists()
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", "")
    code, _, err = run_main(["check", "--engine", pt2, "--per-call-only"])
    assert_one_line_error(code, err, ["native code", "--trust-native-code"])


def test_traversal_member_never_extracted(tmp_path: Path, pt2: Path):
    """A member ``.../../../victim.txt`` (manifest updated): refused before extraction even when trusted -- torch's
    loader would write it outside its folder (the issue's overwrite, with `check` then passing)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    name = "digits/data/aotinductor/model/" + "../" * 40 + str(victim).lstrip("/")
    bad = _retamper(pt2, tmp_path / "t", add={name: b"overwritten"})
    code, _, err = run_main(["check", "--engine", bad, "--per-call-only", "--trust-native-code"])
    assert_one_line_error(code, err, ["'..'", "refusing to extract"])
    assert victim.read_text() == "original"


@pytest.fixture
def ctor_library(tmp_path: Path) -> tuple[bytes, Path]:
    """A shared library whose constructor writes a marker file (what a replaced .so could do on load)."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "ctor.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void ran(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "ctor.so"), str(src)], check=True)
    return (tmp_path / "ctor.so").read_bytes(), marker


def test_replaced_library_never_runs_and_leaves_nothing(tmp_path: Path, pt2: Path, ctor_library, monkeypatch):
    """The package's .so replaced (manifest updated): without trust its constructor never runs; with
    --trust-native-code the user chose to run it, and the failed load still leaves no extracted folder behind."""
    import tempfile

    lib, marker = ctor_library
    bad = _retamper(pt2, tmp_path / "r", replace={".wrapper.so": lib})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, _, err = run_main(["sample", "--engine", bad, "--out", tmp_path / "s.png", "--no-progress"])
    assert_one_line_error(code, err, ["native code", "--trust-native-code"])
    assert not marker.exists()  # refused before the library was ever extracted or loaded
    code, _, err = run_main(["sample", "--engine", bad, "--out", tmp_path / "s.png", "--no-progress",
                             "--trust-native-code"])
    assert_one_line_error(code, err, "cannot load the AOTInductor package")
    assert marker.exists()  # trusted: it did run (that is what the flag means)
    assert list(scratch.iterdir()) == []  # the extraction folder (with the .so) is gone on the failure path
    assert not (tmp_path / "s.png").exists()


def test_loaded_package_extraction_removed_on_close(tmp_path: Path, pt2: Path, monkeypatch):
    import tempfile

    from ditdeploy.runtimes import load

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    den = load(pt2)
    [private] = list(scratch.iterdir())
    assert private.name.startswith(".ditdeploy-pt2-") and any(private.rglob("*.so"))
    den.close()
    assert list(scratch.iterdir()) == []
