"""The JSON manifest beside every artifact, as a typed object: :class:`Manifest`.

A manifest ``<artifact>.json`` (``s2.onnx`` -> ``s2.onnx.json``) records what the artifact is (kind, format,
precision, model config, batch limits, decoder, source checkpoint...), the sha256 of every file it consists of, and
parity numbers measured at export. :class:`Manifest` is the one place that reads those fields: every reader in the
package uses its typed accessors (``kind``, ``precision``, ``config``, ``batch``, ``decoder_path()``,
``reference_checkpoint()``...) instead of ``.get("...")`` on a raw dict.

``Manifest`` is a ``dict`` subclass on purpose: fields this module does not know are kept untouched, so a manifest
that is loaded and saved again is byte-identical (same keys, same ``json.dumps(indent=2, sort_keys=True)``), and code
that treated ``denoiser.manifest`` as a mapping keeps working. Numpy + stdlib only (the deploy path imports it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.artifact.files import (
    MANIFEST_VERSION,
    is_snapshot_dir,
    json_text,
    manifest_path,
    safe_member,
    sha256_file,
    tool_versions,
    write_json_atomic,
)
from ditdeploy.config.variants import LATENT_CHANNELS, DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.system.cpu_isa import detect

_MAX_SOURCE_DEPTH = 3  # INT8 -> fp32 ONNX -> ... : how many ``source`` links reference_checkpoint() follows
# What every derived artifact (INT8 ONNX, OpenVINO IR, TensorRT engine, the pair's IRs, the INT8 decoder) keeps from
# the artifact it was made from: what the model is, how it is called, where it came from. The deriving step sets
# what it changes (format, precision, parity, batch profile...) on top (:meth:`Manifest.derive`).
CARRIED = ("kind", "precision", "config", "opset", "batch", "io", "decoder", "variant", "input_size", "space",
           "checkpoint", "source_checkpoint", "id2label", "random_weights", "calibration_sha256", "excluded_nodes",
           "int8", "latent_channels", "upsample", "scaling_factor", "shift_factor", "image_size", "name")


@dataclass(frozen=True)
class BatchLimits:
    """The batch sizes an artifact was built for (``batch`` table); ``None`` = not recorded / unbounded."""

    min: int | None = None
    opt: int | None = None
    max: int | None = None


def _opt_int(v: Any, what: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except (TypeError, ValueError, OverflowError) as e:
        raise ArtifactError(f"the manifest's {what} {v!r} is not an integer: re-export the artifact") from e
    if n < 1 or isinstance(v, bool):
        raise ArtifactError(f"the manifest's {what} {v!r} is not a positive integer: re-export the artifact")
    return n


#: the type of each top-level field a reader uses (None: the field may be null); checked when a manifest is read
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "format": (str,), "precision": (str,), "artifact": (str,), "decoder": (str, type(None)),
    "config": (dict, type(None)), "batch": (dict, type(None)), "id2label": (dict, type(None)),
    "cache_graphs": (dict, type(None)),
}


def _check_types(raw: dict[str, Any], mp: Path) -> None:
    """One line for a field of the wrong JSON type (a list where a table belongs, a number for a file name)."""
    for key, types in _FIELD_TYPES.items():
        if key in raw and not isinstance(raw[key], types):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "a table"}[t.__name__]
                               for t in types)
            raise ArtifactError(f"manifest {mp.name}: field {key!r} is {type(raw[key]).__name__} {raw[key]!r:.40}, "
                                f"expected {want}: re-export the artifact")


def _is_snapshot(path: Path) -> bool:
    return is_snapshot_dir(path)


class Manifest(dict):
    """A loaded (or freshly built) manifest: the raw JSON fields plus the artifact path they describe.

    Build one with :meth:`load` (reads ``<artifact>.json``, verifies sha256s), :meth:`build` (a new manifest for
    files just written) or ``Manifest(fields, artifact=path)``; write it with :meth:`save`.
    """

    def __init__(self, fields: dict[str, Any] | None = None, artifact: str | os.PathLike | None = None):
        super().__init__(fields or {})
        self.artifact = Path(artifact) if artifact is not None else None

    @classmethod
    def of(cls, obj: Any, artifact: str | os.PathLike | None = None) -> Manifest:
        """``obj`` itself when it is a Manifest, else a Manifest over a plain dict (``{}`` for None)."""
        if isinstance(obj, Manifest):
            return obj
        return cls(dict(obj) if obj else {}, artifact)

    # ------------------------------------------------------------------------------------------------ load / save
    @classmethod
    def load(cls, artifact: str | os.PathLike, verify: bool = True, required: bool = True) -> Manifest | None:
        """Read the manifest beside ``artifact`` and (by default) verify every file's sha256.

        Raises ArtifactError with a one-line reason when the manifest is missing (if ``required``), unreadable,
        names an unsafe path, or a hash does not match. Returns None for a missing optional manifest.
        """
        artifact = Path(artifact)
        mp = manifest_path(artifact)
        if not mp.exists():
            if required:
                raise ArtifactError(f"no manifest {mp.name} beside {artifact}: re-export it with `ditdeploy export`")
            return None
        try:
            raw = json.loads(mp.read_text())
        except (OSError, ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
            raise ArtifactError(f"manifest {mp} is not valid JSON ({why}); re-export the artifact") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
            raise ArtifactError(f"manifest {mp} lacks the 'files' table; re-export the artifact")
        _check_types(raw, mp)
        m = cls(raw, artifact)
        if verify:
            m.verify()
        return m

    @classmethod
    def build(cls, artifact: str | os.PathLike, files: list[str | os.PathLike], **fields: Any) -> Manifest:
        """A new manifest for ``artifact``: ``fields`` plus sha256 and size of every file (names relative), the tool
        versions and the writing machine's ``cpu_isa`` (:func:`ditdeploy.system.cpu_isa.detect`)."""
        artifact = Path(artifact)
        entries = {}
        for f in files:
            f = Path(f)
            entries[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        return cls({"manifest_version": MANIFEST_VERSION, "artifact": artifact.name, "files": entries,
                    "tools": tool_versions(), "cpu_isa": detect().record(), **fields}, artifact)

    def verify(self, artifact: str | os.PathLike | None = None) -> None:
        """Check that every listed file exists beside the artifact with the recorded sha256."""
        artifact = Path(artifact) if artifact is not None else self._artifact()
        base = artifact.parent
        files = self.get("files")
        if not isinstance(files, dict) or artifact.name not in files:  # else an emptied table would verify nothing
            raise ArtifactError(f"the manifest of {artifact.name} does not list its sha256: re-export the artifact")
        for name, meta in files.items():
            p = safe_member(base, name)
            if not p.exists():
                raise ArtifactError(f"{p} listed in the manifest is missing: copy it next to {artifact.name}")
            want = meta.get("sha256") if isinstance(meta, dict) else meta
            got = sha256_file(p)
            if got != want:
                raise ArtifactError(
                    f"sha256 mismatch for {p.name} (manifest {str(want)[:12]}…, file {got[:12]}…): "
                    "the file is corrupt or was modified; re-export it"
                )

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the manifest atomically (default: beside its artifact); returns the path written."""
        out = Path(path) if path is not None else manifest_path(self._artifact())
        write_json_atomic(out, dict(self))
        return out

    def to_json(self) -> str:
        """The exact text :meth:`save` writes."""
        return json_text(dict(self))

    def _artifact(self) -> Path:
        if self.artifact is None:
            raise DitDeployError("this manifest is not tied to an artifact path")
        return self.artifact

    # ------------------------------------------------------------------------------------------------ fields
    def section(self, key: str) -> dict[str, Any]:
        """A sub-table (``source``, ``openvino``, ``tensorrt``, ``int8``...) or ``{}`` when absent or not a table."""
        v = self.get(key)
        return v if isinstance(v, dict) else {}

    @property
    def kind(self) -> str | None:
        """``denoiser`` | ``decoder`` | ``calibration`` | ... (None when not recorded)."""
        v = self.get("kind")
        return str(v) if v is not None else None

    @property
    def format(self) -> str | None:
        """``onnx`` | ``openvino`` | ``tensorrt`` | ``torch`` | ... (None when not recorded)."""
        v = self.get("format")
        return str(v) if v is not None else None

    @property
    def precision(self) -> str:
        """The artifact's numeric precision as recorded (``fp32`` when not recorded)."""
        return str(self.get("precision", "fp32"))

    @property
    def files(self) -> dict[str, Any]:
        """The sha256/size table, by file name."""
        return self.section("files")

    @property
    def total_bytes(self) -> int:
        """Sum of the recorded file sizes."""
        return sum(int(f.get("bytes", 0)) for f in self.files.values() if isinstance(f, dict))

    @property
    def config_dict(self) -> dict[str, Any] | None:
        """The raw model ``config`` table, or None."""
        c = self.get("config")
        return c if isinstance(c, dict) else None

    @property
    def config(self) -> DiTConfig:
        """The model's DiTConfig; ArtifactError when the manifest has none or an invalid one."""
        c = self.config_dict
        name = self.artifact.name if self.artifact is not None else "the artifact"
        if c is None:
            raise ArtifactError(f"manifest of {name} has no model 'config': re-export the artifact")
        try:
            return DiTConfig.from_dict(c)
        except (DitDeployError, TypeError) as e:
            raise ArtifactError(f"manifest of {name} has an invalid model config: {e}") from e

    def require_kind(self, *kinds: str) -> Manifest:
        """Return self; ArtifactError when ``kind`` is not one of ``kinds``."""
        if self.kind not in kinds:
            name = self.artifact.name if self.artifact is not None else "the artifact"
            raise ArtifactError(f"{name} is a {self.kind!r} artifact according to its manifest, expected a "
                                f"{' or '.join(kinds)}")
        return self

    @property
    def batch(self) -> BatchLimits:
        """The recorded ``batch`` table (min/opt/max), each None when absent."""
        b = self.section("batch")
        return BatchLimits(_opt_int(b.get("min"), "batch.min"), _opt_int(b.get("opt"), "batch.opt"),
                           _opt_int(b.get("max") or None, "batch.max"))

    @property
    def max_batch(self) -> int | None:
        """The largest batch the artifact accepts (``batch.max``), or None when unbounded."""
        return _opt_int(self.section("batch").get("max") or None, "batch.max")

    @property
    def latent_channels(self) -> int:
        """Latent channels of a decoder (``latent_channels`` or ``config.latent_channels``), else 4."""
        for src in (self, self.config_dict or {}):
            v = src.get("latent_channels")
            if v:
                return int(v)
        return LATENT_CHANNELS

    @property
    def scaling_factor(self) -> float | None:
        """The VAE's latent scaling factor, when recorded."""
        v = self.get("scaling_factor")
        return float(v) if v is not None else None

    @property
    def decoder_name(self) -> str | None:
        """The VAE decoder file the artifact names (relative to its folder), or None."""
        v = self.get("decoder")
        return str(v) if v else None

    def decoder_path(self, existing: bool = True) -> Path | None:
        """The VAE decoder beside the artifact that this manifest names (refusing paths that escape its folder).

        None when the manifest names none or (with ``existing``) when the named file is not there.
        """
        name = self.decoder_name
        if not name:
            return None
        p = safe_member((self.artifact or Path("x")).parent, name)
        return p if (p.exists() or not existing) else None

    @property
    def int8_full_range(self) -> bool:
        """An INT8 artifact whose weights use the full int8 range (they can saturate on x86 CPUs without VNNI:
        ``ditdeploy.system.cpu_isa``); manifests written before ``int8.saturates_without_vnni`` was recorded count as
        full range (that was the only form)."""
        if self.precision != "int8":
            return False
        return bool(self.section("int8").get("saturates_without_vnni", True))

    @property
    def openvino_hint(self) -> str | None:
        """The OpenVINO ``INFERENCE_PRECISION_HINT`` recorded at conversion, or None."""
        v = self.section("openvino").get("inference_precision_hint")
        return str(v) if v else None

    @property
    def source(self) -> dict[str, Any]:
        """Where the artifact came from (``source`` table: checkpoint/path/sha256, or for a derived artifact
        artifact/sha256/precision; ``onnx`` in manifests written before :meth:`derive`)."""
        return self.section("source")

    @property
    def source_precision(self) -> str | None:
        """The precision of the ONNX an INT8/engine artifact was made from, when recorded."""
        v = self.source.get("precision")
        return str(v) if v else None

    def source_checkpoint(self) -> dict[str, Any]:
        """``{"checkpoint": path, "checkpoint_sha256": sha}`` of the torch checkpoint in ``source``, or ``{}``."""
        s = self.source
        ck = s.get("checkpoint") or s.get("path")
        return {"checkpoint": str(ck), "checkpoint_sha256": s.get("sha256")} if ck else {}

    def reference_checkpoint(self, shipped_fallback: bool = False) -> Path | None:
        """The torch checkpoint the artifact was made from, as recorded: ``checkpoint`` / ``source_checkpoint`` /
        ``source.checkpoint`` / ``source.path`` (relative to the artifact's folder or absolute), following
        the lineage ``source.artifact`` (``source.onnx`` before ``derive``) of INT8 / OpenVINO / engine artifacts
        through that file's manifest.

        With ``shipped_fallback``, a ``digits`` model with no checkpoint found falls back to the shipped weights.
        None when unknown.
        """
        found = self._reference_checkpoint(0)
        if found is None and shipped_fallback and (self.config_dict or {}).get("variant") == "digits":
            from ditdeploy.sources import shipped

            found = shipped.digits_checkpoint()
        return found

    def _reference_checkpoint(self, depth: int) -> Path | None:
        base = (self.artifact or Path("x")).parent
        s = self.source
        for src in (self.get("checkpoint"), self.get("source_checkpoint"), s.get("checkpoint"), s.get("path")):
            if isinstance(src, dict):
                src = src.get("path") or src.get("name")
            if not src:
                continue
            p = Path(str(src))
            for cand in ((p,) if p.is_absolute() else (base / p, p)):
                if cand.is_file() or _is_snapshot(cand):  # a diffusers snapshot folder (export --checkpoint DIR)
                    return cand
        parent = s.get("artifact") or s.get("onnx")  # "onnx": manifests written before Manifest.derive
        if parent and depth < _MAX_SOURCE_DEPTH:
            try:
                pm = Manifest.load(base / Path(str(parent)).name, verify=False, required=False)
            except ArtifactError:
                return None
            return pm._reference_checkpoint(depth + 1) if pm is not None else None
        return None

    @property
    def calibration_sha256(self) -> str | None:
        """sha256 of the calibration set an INT8 artifact was quantized with, when recorded."""
        v = self.get("calibration_sha256")
        return str(v) if v else None

    @property
    def excluded_nodes(self) -> tuple[str, ...]:
        """Nodes an INT8 artifact left unquantized (``excluded_nodes``), ``()`` when none are recorded."""
        return tuple(str(n) for n in (self.get("excluded_nodes") or ()))

    def carry(self, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
        """The fields named in ``keys`` that are present (for derived artifacts that copy model fields)."""
        return {k: self[k] for k in keys if k in self}

    def derive(self, out: str | os.PathLike | None = None, *, sha256: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """The manifest fields of an artifact made from this one (its ``artifact``): the :data:`CARRIED` fields
        it has (the decoder only when it sits beside ``out``), the lineage ``source`` = ``{artifact, sha256,
        precision}``, the torch checkpoint as ``source_checkpoint`` (the one spelling written; older manifests'
        ``checkpoint`` / ``source.checkpoint`` / ``source.path`` are still read), then ``fields`` (what the new
        artifact changes) on top. ``sha256``: the source file's, when its manifest's table does not hold it."""
        carried = self.carry(CARRIED)
        dec = self.decoder_name
        if out is not None and dec and not (Path(out).parent / str(dec)).exists():
            carried.pop("decoder", None)
        ck = self.source_checkpoint()
        if not carried.get("source_checkpoint") and ck:
            carried["source_checkpoint"] = {"path": ck["checkpoint"], "sha256": ck["checkpoint_sha256"]}
        src = self._artifact()
        digest = sha256 or self.file_sha256(src.name) or sha256_file(src)
        return {**carried, "source": {"artifact": src.name, "sha256": digest, "precision": self.precision},
                **fields}

    def file_sha256(self, name: str) -> str | None:
        """The sha256 the ``files`` table records for ``name``, or None."""
        meta = (self.get("files") or {}).get(name)
        v = meta.get("sha256") if isinstance(meta, dict) else meta
        return str(v) if v else None



def make_manifest(artifact: str | os.PathLike, files: list[str | os.PathLike], **fields: Any) -> Manifest:
    """Build a manifest for ``artifact``: ``fields`` plus sha256 and size of every file (see :class:`Manifest`)."""
    return Manifest.build(artifact, files, **fields)


def load_manifest(artifact: str | os.PathLike, verify: bool = True, required: bool = True) -> Manifest | None:
    """Read (and by default sha256-verify) the manifest beside ``artifact``: :meth:`Manifest.load`."""
    return Manifest.load(artifact, verify=verify, required=required)


def verify_manifest(artifact: str | os.PathLike, m: dict[str, Any]) -> None:
    """Check that every file listed in manifest ``m`` exists beside ``artifact`` with the recorded sha256."""
    Manifest(m, artifact).verify()
