"""Native-code artifacts (issue #23 item 1): the trust switch (``ditdeploy.artifact.trust``: --trust-native-code or the
trusted-digests file) and the zip checks before extraction (``ditdeploy.artifact.zip_members``). The tampered real ``.pt2``
cases (a ``..`` member, a replaced shared library, a failed load's leftovers) are in tests/test_aoti.py, which
compiles one package for its module."""

from __future__ import annotations

import dataclasses
import stat
import zipfile
from pathlib import Path

import pytest

from ditdeploy.artifact.files import sha256_file, write_json_atomic
from ditdeploy.artifact.manifest import make_manifest
from ditdeploy.artifact.trust import (
    UntrustedNativeCode,
    record_trusted,
    require_trusted,
    trusted_digests,
    trusted_file,
)
from ditdeploy.artifact.zip_members import MAX_MEMBERS, PrivateDir, check_zip
from ditdeploy.config.variants import DIGITS
from ditdeploy.errors import ArtifactError
from tests.conftest import assert_one_line_error, run_main


# ------------------------------------------------------------------------------------------------ the trusted list
def test_trusted_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", str(tmp_path / "t.txt"))
    assert trusted_file() == tmp_path / "t.txt"
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", "")
    assert trusted_file() is None  # off
    monkeypatch.delenv("DITDEPLOY_TRUSTED_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert trusted_file() == tmp_path / "cfg" / "ditdeploy" / "trusted.txt"


def test_record_and_read_digests(monkeypatch, tmp_path):
    f = tmp_path / "sub" / "trusted.txt"
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", str(f))
    a, b = "a" * 64, "0123456789abcdef" * 4
    assert record_trusted(a, "x.pt2", "aoti") == f and record_trusted(a, "x.pt2", "aoti") == f  # once
    assert f.read_text().count(a) == 1 and "aoti x.pt2" in f.read_text()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    f.write_text(f.read_text() + f"# {b}\n{b.upper()}  hand-added\nnot-a-digest\n{'f' * 63}\n")
    assert trusted_digests() == {a, b}  # comments and malformed lines ignored, case folded
    assert record_trusted("zz", "x.pt2", "aoti") is None
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", "")
    assert record_trusted(a, "x.pt2", "aoti") is None and trusted_digests() == set()


def test_require_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("DITDEPLOY_TRUSTED_FILE", str(tmp_path / "t.txt"))
    art = tmp_path / "m.pt2"
    art.write_bytes(b"native")
    with pytest.raises(UntrustedNativeCode) as e:
        require_trusted(art, "aoti", False)
    msg = str(e.value)
    assert "\n" not in msg and "--trust-native-code" in msg and "shared library" in msg
    assert sha256_file(art)[:12] in msg and str(tmp_path / "t.txt") in msg
    require_trusted(art, "aoti", True)  # the flag
    require_trusted(art, "onnxruntime", False)  # data formats need nothing
    record_trusted(sha256_file(art), art, "aoti")
    require_trusted(art, "aoti", False)  # the list
    art.write_bytes(b"native, changed")  # other bytes: not trusted any more, whatever a manifest says
    with pytest.raises(UntrustedNativeCode):
        require_trusted(art, "aoti", False)
    forged = {"files": {"m.pt2": {"sha256": "0" * 64}}}
    with pytest.raises(UntrustedNativeCode):
        require_trusted(art, "aoti", False, verified=forged)


def _plan(tmp_path: Path) -> Path:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a real engine")
    m = make_manifest(plan, [plan], kind="denoiser", format="tensorrt", precision="fp16",
                      config=dataclasses.asdict(DIGITS), batch={"min": 1, "opt": 8, "max": 16},
                      tensorrt={"version": "10.1.0"}, gpu={"name": "NVIDIA H100", "compute_capability": "9.0"})
    write_json_atomic(tmp_path / "m.plan.json", m)
    return plan


@pytest.mark.parametrize("command", ["sample", "check", "bench", "calibrate"])
def test_foreign_tensorrt_engine_refused_before_tensorrt(tmp_path, command):
    """An engine nobody trusted is refused in one line before TensorRT (not installed here) is even imported;
    every command that loads artifacts says how to allow it."""
    plan = _plan(tmp_path)
    args = {"sample": ["sample", "--engine", plan, "--out", tmp_path / "s.png", "--no-progress"],
            "check": ["check", "--engine", plan, "--per-call-only"],
            "bench": ["bench", "--engine", plan, "--no-torch", "--no-probe", "--in-process"],
            "calibrate": ["calibrate", "--engine", plan, "--out", tmp_path / "c.npz"]}[command]
    code, out, err = run_main(args)
    text = err if command != "bench" else out + err
    assert code != 0 and "native code" in text and "--trust-native-code" in text, text
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "c.npz").exists()
    if command != "bench":
        assert_one_line_error(code, err, ["TensorRT engine", "--trust-native-code"])
    code, out, err = run_main([*args, "--trust-native-code"])  # trusted: now it is TensorRT that is missing
    assert code != 0 and "native code" not in out + err and "tensorrt" in (out + err).lower()


# ------------------------------------------------------------------------------------------------ zip members
def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, data)
    return path


def _link(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.create_system = 3
    return info


@pytest.mark.parametrize("members, words", [
    ([("m/data/../../../../etc/victim.txt", b"x")], "'..'"),
    ([("/tmp/victim.txt", b"x")], "absolute"),
    ([("C:/victim.txt", b"x")], "absolute"),
    ([("m\\..\\..\\victim.txt", b"x")], "'..'"),
    ([(_link("m/data/lib.so", "/etc/passwd"), b"/etc/passwd")], "link"),
    ([("m/a", b"1"), ("m/a", b"2")], "twice"),
])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_unsafe_members_refused(tmp_path, members, words):
    p = _zip(tmp_path / "bad.pt2", members)
    with pytest.raises(ArtifactError, match=words) as e:
        check_zip(p, "the AOTInductor package")
    assert "\n" not in str(e.value) and "cannot load the AOTInductor package bad.pt2" in str(e.value)


def test_member_count_and_sizes_bounded(tmp_path, monkeypatch):
    ok = _zip(tmp_path / "ok.pt2", [("m/data/a.bin", b"abc"), ("m/version", b"1")])
    assert [i.filename for i in check_zip(ok)] == ["m/data/a.bin", "m/version"]
    monkeypatch.setattr("ditdeploy.artifact.zip_members.MAX_MEMBERS", 3)
    many = _zip(tmp_path / "many.pt2", [(f"m/{i}", b"") for i in range(4)])
    with pytest.raises(ArtifactError, match="4 members"):
        check_zip(many)
    assert MAX_MEMBERS >= 1000  # the real bound leaves room for a CUDA package's hundreds of cubins
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/zeros", b"\0" * (8 << 20))  # 8 MiB of zeros deflate to ~8 KiB: ratio ~1000
    with pytest.raises(ArtifactError, match="uncompressed"):
        check_zip(bomb)


def test_local_header_must_match_the_directory(tmp_path):
    p = _zip(tmp_path / "two.pt2", [("m/aaaa", b"1")])
    raw = bytearray(p.read_bytes())
    i = raw.index(b"m/aaaa")  # the first occurrence is the local header's name
    raw[i:i + 6] = b"../../"
    p.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="inconsistent"):
        check_zip(p)


def test_not_a_zip(tmp_path):
    p = tmp_path / "x.pt2"
    p.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArtifactError, match="not a readable zip"):
        check_zip(p)


def test_private_dir_is_removed_and_tagged(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = PrivateDir("pt2")
    assert d.path.parent == tmp_path and d.path.name.startswith(f".ditdeploy-pt2-{os.getpid()}-")
    assert stat.S_IMODE(d.path.stat().st_mode) == 0o700
    with d.as_tmpdir():
        assert os.environ["TMPDIR"] == str(d.path)
        (d.path / "x").write_text("1")
    assert os.environ.get("TMPDIR") != str(d.path)
    d.remove()
    assert not d.path.exists()
    stale = tmp_path / ".ditdeploy-pt2-999999999-abcdefgh"  # a killed run's (no such pid)
    stale.mkdir()
    PrivateDir("pt2").remove()
    assert not stale.exists()


@pytest.mark.parametrize("command", ["sample", "check", "bench", "calibrate", "serve"])
def test_every_loading_command_has_the_switch(command):
    code, out, _ = run_main([command, "--help"])
    assert code == 0 and "--trust-native-code" in out
