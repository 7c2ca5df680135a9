"""AOTInductor backend: run a ``.pt2`` package from ``ditdeploy export --fmt aoti``, no Python model code.

AOTInductor's C++ package loader runs it, single-threaded; this module imports torch, like the torch backend.

A ``.pt2`` is native code: it loads only with ``trust_native_code=True`` or its sha256 in the trusted list
(``ditdeploy.artifact.trust``), after its zip members are checked, into a private folder
(``ditdeploy.artifact.zip_members``). Before loading, the manifest is checked against this machine: the torch
version that compiled the package (a ``.pt2`` holds a shared library built against that libtorch) and the
device it was compiled for (a CUDA package needs a CUDA device; a CPU package runs on the CPU only). Each
mismatch, a truncated or corrupt package, is one line. Batches below the package's minimum batch are padded
(rows repeated, outputs dropped), above its maximum chunked. On CUDA, inputs are staged once per call and
``cuda_graph=True`` replays a captured graph per batch size (``ditdeploy.runtimes.cuda_staging``).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.runtimes.base import DenoiserBase, read_manifest
from ditdeploy.runtimes.registry import BackendSpec

BACKEND = BackendSpec("aoti", reads=(".pt2",), claims=(".pt2",), aliases=("aotinductor", "pt2"),
                      distributions=("torch",), imports="torch")


def _torch():
    if "torch" not in sys.modules:
        # OpenMP threads that sleep when idle instead of spinning (read when torch loads libgomp): on a shared CPU
        # the spinning default made the digits .pt2 7x slower per call here (14 s vs 2.2 s for 10 calls, load 12);
        # the bench harness gives its torch worker the same setting. A user-set value is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as e:
        from ditdeploy.runtimes.base import missing

        raise missing("torch", "a .pt2 (AOTInductor) package needs PyTorch, the version that compiled it") from e
    return torch


def _release(version: str) -> tuple[int, ...]:
    """``2.13.0+cpu`` -> (2, 13, 0): the release; the local tag (+cpu/+cu128) is the device build, checked apart."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def check_package_compat(m: dict[str, Any], path: Path, torch_version: str, cuda_available: bool,
                         device: str | None) -> str:
    """The device to run on; ArtifactError when this torch or machine cannot run the package."""
    info = m.get("torch") if isinstance(m.get("torch"), dict) else {}
    built_v = str(info.get("version") or "")
    if not built_v:
        raise ArtifactError(f"the manifest of {path.name} does not record the torch version that compiled it: "
                            "re-export it (`ditdeploy export --fmt aoti`)")
    if _release(built_v) != _release(torch_version):
        raise ArtifactError(f"{path.name} was compiled by torch {built_v}; this is torch {torch_version}: an AOTInductor "
                            "package only loads with the torch that built it: re-export it here")
    built = str(m.get("device") or "cpu")
    want = (device or built).split(":")[0]
    if want not in ("cpu", "cuda"):
        raise DitDeployError(f"device {device!r}: choose cpu or cuda")
    if want != built:
        raise ArtifactError(f"{path.name} was compiled for {built} and cannot run on {want}: export it again with "
                            f"--device {want}")
    if built == "cuda" and not cuda_available:
        raise ArtifactError(f"{path.name} was compiled for CUDA and torch {torch_version} sees no CUDA device here: "
                            "run it on a GPU machine, or export a CPU package (--device cpu)")
    return device or built


class AotiDenoiser(DenoiserBase):
    """A ``.pt2`` denoiser: numpy in, numpy out, through the compiled package."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, device: str | None = None,
                 threads: int | None = None, cuda_graph: bool = False, manifest: dict[str, Any] | None = None,
                 trust_native_code: bool = False):
        torch = _torch()
        self.path = Path(path)
        self.manifest = (Manifest.of(manifest, self.path) if manifest is not None
                         else read_manifest(self.path, "denoiser", verify))
        if self.manifest.format != "aoti":
            raise ArtifactError(f"{self.path.name} is a {self.manifest.format!r} artifact, not an AOTInductor "
                                "package")
        self.config = self.manifest.config
        dev = check_package_compat(self.manifest, self.path, torch.__version__, torch.cuda.is_available(), device)
        self.device = torch.device(dev)
        if cuda_graph:
            from ditdeploy.runtimes.cuda_staging import require_cuda_for_graph

            require_cuda_for_graph(self.device, self.path.name)
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.model = load_package(self.path, self.device, trust_native_code=trust_native_code,
                                  verified=self.manifest if verify and manifest is None else None)
        self.max_batch = self.manifest.max_batch
        self.min_batch = self.manifest.batch.min or 1
        self.precision = self.manifest.precision
        self.name = f"aoti:{self.device.type}{':cuda-graph' if cuda_graph else ''}:{self.precision}"
        self.staged = None
        if self.device.type == "cuda":
            from ditdeploy.runtimes.cuda_staging import StagedCall

            self.staged = StagedCall(self.model, self.device, graph=cuda_graph)

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < self.min_batch:  # the package's batch range starts above n: pad with copies of the first row
            pad = self.min_batch - n
            x, t, y = (np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in (x, t, y))
        if self.staged is not None:
            out = self.staged(x, t, y)
        else:
            with self.torch.inference_mode():
                out = self.model(*(self.torch.from_numpy(a) for a in (x, t, y))).numpy()
        return out[:n]

    def close(self) -> None:
        if self.staged is not None:
            self.staged.close()
        if self.model is not None:
            self.model.close()
        self.model = None


_ISA_ORDER = ("DEFAULT", "AVX2", "AVX512")


def check_package_metadata(md: dict[str, str], path: Path, device: Any, cpu_capability: str,
                           cuda_capability: tuple[int, int] | None) -> None:
    """The package's own record (``AOTI_DEVICE_KEY``, ``AOTI_CPU_ISA``, ``AOTI_COMPUTE_CAPABILITY``) against this
    machine: a CPU package compiled for AVX-512 would die with an illegal instruction on an AVX2-only CPU."""
    key = str(md.get("AOTI_DEVICE_KEY") or "")
    if key and key != device.type:
        raise ArtifactError(f"{path.name} holds a {key} model but its manifest says {device.type}: the files do not "
                            "belong together; re-export it")
    if device.type == "cpu":
        need = (str(md.get("AOTI_CPU_ISA") or "").split() or ["DEFAULT"])[0].upper()
        have = cpu_capability.upper()
        if need in _ISA_ORDER and have in _ISA_ORDER and _ISA_ORDER.index(need) > _ISA_ORDER.index(have):
            raise ArtifactError(f"{path.name} was compiled for {need} CPUs; this CPU supports {have}: re-export it "
                                "on (or for) this machine")
    cc = str(md.get("AOTI_COMPUTE_CAPABILITY") or "")
    if device.type == "cuda" and cc and cuda_capability is not None and cc != f"{cuda_capability[0]}{cuda_capability[1]}":
        raise ArtifactError(f"{path.name} was compiled for compute capability {cc}; this GPU is "
                            f"{cuda_capability[0]}.{cuda_capability[1]}: re-export it on this GPU")


# ``run_single_threaded=True`` (AOTIModelPackageLoader's third argument, torch 2.11 and 2.13 alike): the container
# then runs without its thread-synchronisation logic. In the default multi-threaded mode a CUDA container, from its
# second call on, queries the CUDA event the previous run recorded, which is illegal while a stream is capturing
# ("operation not permitted when stream is capturing"): such a package cannot be replayed as a CUDA graph
# (``--cuda-graph``; aoti_load_package's docstring gives the same reason). Calls are serialised by a lock instead.
RUN_SINGLE_THREADED = True


class Package:
    """A loaded ``.pt2``: ``pkg(x, t, y) -> out`` (calls serialised: single-threaded mode has no locking of its own);
    :meth:`close` frees the loader and removes the private folder it was extracted into."""

    def __init__(self, loader: Any, private: Any):
        self._loader, self._private, self._lock = loader, private, threading.Lock()

    def __call__(self, x: Any, t: Any, y: Any) -> Any:
        with self._lock:
            out = self._loader(x, t, y) if callable(self._loader) else self._loader.run([x, t, y])
        return out[0] if isinstance(out, (list, tuple)) else out

    def close(self) -> None:
        self._loader = None  # the C++ loader removes its own extraction folder first
        self._private.remove()


def load_package(path: Path, device: Any, *, trust_native_code: bool = False,
                 verified: dict[str, Any] | None = None) -> Package:
    """The package loaded through AOTInductor's C++ loader (``aoti_load_package`` wraps the same loader but first
    imports the whole inductor and probes the compiler for CPU ISAs: ~10 s here, vs 0.1 s).

    Before a byte reaches native code: the trust check (``ditdeploy.artifact.trust``: the flag, or the file's sha256 --
    ``verified``'s entry when that manifest was just checked, else hashed -- in the trusted list) and the zip check (``ditdeploy.artifact.zip_members``: no
    absolute/``..``/link members, bounded count and sizes). The loader extracts into a private folder (``TMPDIR``
    for its duration) that is removed on failure and by :meth:`Package.close`. Every failure is one line."""
    import torch

    from ditdeploy.artifact.trust import require_trusted
    from ditdeploy.artifact.zip_members import PrivateDir, check_zip

    require_trusted(path, "aoti", trust_native_code, verified)
    check_zip(path, "the AOTInductor package")
    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    idx = device.index if device.index is not None else -1
    private = PrivateDir("pt2")
    try:
        with private.as_tmpdir():
            if loader_cls is None:  # pragma: no cover - other torch builds
                return Package(torch._inductor.aoti_load_package(str(path), run_single_threaded=RUN_SINGLE_THREADED,
                                                                 device_index=idx), private)
            md = dict(loader_cls.load_metadata_from_package(str(path), "model"))
            cuda_cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
            check_package_metadata(md, path, device, torch.backends.cpu.get_cpu_capability(), cuda_cc)
            return Package(loader_cls(str(path), "model", RUN_SINGLE_THREADED, 1, idx), private)
    except ArtifactError:
        private.remove()
        raise
    except Exception as e:
        private.remove()
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"cannot load the AOTInductor package {path.name} ({type(e).__name__}: {first}): the file "
                            "is truncated, corrupt or from another torch build; re-export it") from e


# the backend entry point used by ditdeploy.runtimes.load: its signature is the option set
load_denoiser = AotiDenoiser
