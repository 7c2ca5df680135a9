"""One deployment handle: an artifact opened on a backend, with its decoder, manifest, class names and reference.

``open_deployment(path, backend, options)`` is what ``sample``, ``check``, ``bench``, ``calibrate``, ``fid`` and the
server use instead of each finding the decoder and the reference checkpoint themselves::

    from ditdeploy.run.deployment import open_deployment

    d = open_deployment("xl2.onnx", backend=None, options={"threads": 4})   # None: the shipped digits model
    d.denoiser(x, t, y)           # loaded on first use (runtimes.load), options checked against the backend
    d.decoder                     # the VAE decoder (--vae or the manifest's), loaded once; None for pixel models
    d.manifest, d.config          # the artifact's Manifest and DiTConfig
    d.class_names                 # {id: name} (the manifest's id2label, digits' "0".."9") or None
    d.reference_checkpoint()      # the torch checkpoint it was made from (or the shipped digits); one-line error
    d.load_reference()            # that checkpoint on the torch backend (the parity reference)

Stdlib only at import; numpy and the runtime load when first used.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["Deployment", "open_deployment"]

# the backend options the commands set, with the flag that sets each (for one-line errors naming the flag); which
# backend takes which is the backend's own option set (ditdeploy.runtimes.options_for)
OPTION_FLAGS = {"threads": "--threads", "providers": "--provider", "precision_hint": "--precision-hint",
                "image_size": "--image-size", "device": "--device", "cuda_graph": "--cuda-graph",
                "trust_native_code": "--trust-native-code"}
# --device names a torch device (cpu, cuda, cuda:1): OpenVINO's and TensorRT's own `device` options mean other things
FLAG_BACKENDS = {"device": ("torch", "aoti")}
# options that only native-code backends take and that the others ignore (their formats are data: ditdeploy.artifact.trust)
IGNORED_ELSEWHERE = ("trust_native_code",)


def backend_options(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options to pass to ``runtimes.load`` for ``backend`` (None/False values dropped); an option meant for
    another backend is a one-line error naming its flag (``runtimes.select_options``)."""
    from ditdeploy.runtimes import select_options

    return select_options(backend, options, flags=OPTION_FLAGS, only=FLAG_BACKENDS, ignored=IGNORED_ELSEWHERE)


@dataclass
class Deployment:
    """An artifact on a backend (see the module docstring). Build it with :func:`open_deployment`."""

    path: Path
    backend: str
    options: dict[str, Any] = field(default_factory=dict)  # what the backend's loader receives (already filtered)
    vae: Path | None = None  # an explicit decoder (--vae); None: the manifest's

    @functools.cached_property
    def denoiser(self) -> Any:
        """The denoiser (``runtimes.load``), loaded on first use; the manifest's sha256s are verified."""
        from ditdeploy.runtimes import load

        return load(self.path, backend=self.backend, **self.options)

    @property
    def loaded(self) -> bool:
        return "denoiser" in self.__dict__

    @functools.cached_property
    def manifest(self) -> Any:
        """The artifact's :class:`~ditdeploy.artifact.manifest.Manifest` (the loaded denoiser's, else read unverified from
        disk without loading anything; ``{}`` when it has none)."""
        from ditdeploy.artifact.manifest import Manifest

        if self.loaded:
            return Manifest.of(self.denoiser.manifest, self.path)
        return Manifest.load(self.path, verify=False, required=False) or Manifest({}, self.path)

    @property
    def config(self) -> Any:
        """The model's DiTConfig (the loaded denoiser's, else the manifest's; None when neither says)."""
        if self.loaded:
            return self.denoiser.config
        return self.manifest.config if self.manifest.config_dict is not None else None

    @functools.cached_property
    def class_names(self) -> dict[int, str] | None:
        """``{class id: name}``: the manifest's id2label, "0".."9" for digits, the ImageNet names for 1000 classes."""
        from ditdeploy.config.labels import for_model

        cfg = self.config
        return for_model(self.manifest, cfg.variant, cfg.num_classes) if cfg is not None else None

    # ------------------------------------------------------------------------------------------------------ decoder
    def decoder_path(self, existing: bool = True) -> Path | None:
        """The one lookup of the VAE decoder: ``vae``, else the file the manifest names beside the artifact (with
        ``existing``: only when it is there). None for pixel-space models and when none is known."""
        if self.vae is not None:
            return Path(self.vae)
        named = self.manifest.decoder_path(existing=existing)  # a name escaping the folder is refused even here
        cfg = self.config
        if cfg is not None and cfg.space == "pixel":
            return None
        return named

    @functools.cached_property
    def decoder(self) -> Any:
        """The VAE decoder, loaded once: on the denoiser's backend when it reads the decoder's file (with the
        options it also takes), a diffusers VAE folder on torch. None for pixel models; a latent model without
        a decoder is a one-line error (see :meth:`optional_decoder`)."""
        cfg = self.denoiser.config
        if cfg.space == "pixel":
            if self.vae is not None:
                raise DitDeployError(f"{cfg.variant} is a pixel-space model: --vae does not apply")
            return None
        path = self.decoder_path(existing=False)
        if path is None:
            raise DitDeployError(
                "this latent-space model needs a VAE decoder: pass --vae vae.onnx (export one with `ditdeploy "
                "export`), or record it as 'decoder' in the artifact's manifest")
        if not path.exists():
            raise DitDeployError(f"VAE decoder {path} not found")
        return _load_decoder(path, self.backend, self.options)

    def optional_decoder(self) -> Any:
        """The decoder when one is there (``check``: image metrics only then), else None."""
        if self.vae is None and (self.config is None or self.config.space == "pixel"
                                 or self.decoder_path(existing=True) is None):
            return None
        return self.decoder

    # ---------------------------------------------------------------------------------------------------- reference
    def reference_checkpoint(self, explicit: str | os.PathLike | None = None, required: bool = True) -> Path | None:
        """The one lookup of the torch checkpoint this artifact was made from: ``explicit`` (``--reference``),
        else the manifest's (following INT8 / OpenVINO / engine lineage), else the shipped weights for digits.
        Not found: a one-line error, or None when not ``required``."""
        if explicit is not None:
            if not Path(explicit).exists():
                raise DitDeployError(f"reference checkpoint {explicit} not found")
            return Path(explicit)
        found = self.manifest.reference_checkpoint(shipped_fallback=True)
        if found is None and required:
            raise DitDeployError(
                f"no PyTorch reference for {self.path.name} (its manifest names no checkpoint that is here): pass "
                "--reference CHECKPOINT, or --golden FILE written by `ditdeploy check --save-golden` on a machine "
                "with torch")
        return found

    def load_reference(self, explicit: str | os.PathLike | None = None) -> Any:
        """The reference checkpoint on the torch backend (the parity reference); one-line errors without torch."""
        return load_reference(self.reference_checkpoint(explicit))


def load_reference(path: Path) -> Any:
    """A torch checkpoint on the torch backend; a one-line error (pointing to golden files) without torch."""
    from ditdeploy.proof.reference_check import has_torch
    from ditdeploy.runtimes import load

    if not has_torch():
        raise DitDeployError("the PyTorch reference needs torch, which is not installed here: check against a golden "
                             "file instead (`ditdeploy check --save-golden g.npz` on a machine with torch, then "
                             "`--golden g.npz` here)")
    try:
        return load(path, backend="torch")
    except ImportError as e:
        raise DitDeployError(f"the PyTorch reference could not be loaded ({e}): use --golden FILE") from e


def _load_decoder(path: Path, backend: str, opts: dict[str, Any]) -> Any:
    from ditdeploy.runtimes import get_backend, load_decoder, resolve_backend, select_options

    if path.is_dir():  # a diffusers AutoencoderKL folder: the torch reference decoder
        return load_decoder(path, backend="torch", **({"threads": opts["threads"]} if "threads" in opts else {}))
    dec_backend = backend if path.suffix.lower() in get_backend(backend).reads else None
    # the denoiser's options that the decoder's backend also takes (its own option set decides)
    dec_opts = select_options(dec_backend or resolve_backend(path), opts, "decoder", strict=False, only=FLAG_BACKENDS)
    return load_decoder(path, backend=dec_backend, **dec_opts)


def open_deployment(path: str | os.PathLike | None = None, backend: str | None = None,
                    options: dict[str, Any] | None = None, *, vae: str | os.PathLike | None = None) -> Deployment:
    """Open the artifact ``path`` (None: the shipped digits model) on ``backend`` (None: from the suffix).

    ``options``: backend options by name (``threads``, ``providers``, ``precision_hint``, ``device``,
    ``cuda_graph``, ``trust_native_code``...; None values mean "not set"); one the backend does not take is a
    one-line error naming its flag. ``vae``: an explicit VAE decoder. Nothing is loaded until used
    (:attr:`Deployment.denoiser`, :attr:`Deployment.decoder`).
    """
    from ditdeploy.runtimes import resolve_backend
    from ditdeploy.sources import shipped

    p = Path(path) if path is not None else shipped.default_model(backend)
    if not p.exists():
        raise DitDeployError(f"no such file: {p}")
    b = resolve_backend(p, backend)
    return Deployment(path=p, backend=b, options=backend_options(b, dict(options or {})),
                      vae=Path(vae) if vae is not None else None)
