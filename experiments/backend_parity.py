"""Image parity of `ditdeploy sample` across backends: torch (reference) vs ONNX Runtime fp32 vs OpenVINO fp32.

Same checkpoint, seed, sampler and labels through ``ditdeploy.run.generation.generate`` on each backend; PSNR
(data range 255) of the uint8 images against torch's, the largest per-pixel difference, and the share of pixels
that are bit-identical. Models:

- ``digits``: the shipped model (ditdeploy/assets/digits.safetensors + digits.onnx; OpenVINO IR converted here);
- ``tiny-latent``: a tiny latent DiT (4x4x4 latents, 5 classes, random weights) with a tiny random diffusers VAE
  (8x upsampling, 32x32 RGB): the denoiser and the VAE decoder both run on the backend under test (torch decodes
  with diffusers ``AutoencoderKL.decode``).

Run::

    python3 experiments/backend_parity.py      # -> bench/results/backend_parity.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ditdeploy.sources import shipped

RUNS = (("ddim", 50), ("ddpm", 250), ("dpm-solver++", 20))


def build(cache: Path) -> dict[str, dict[str, Path | None]]:
    """Artifacts for both models in ``cache`` (reused when present)."""
    import torch
    from diffusers import AutoencoderKL

    from ditdeploy.config.variants import DiTConfig
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.openvino import export_openvino
    from ditdeploy.export.randomize import random_model
    from ditdeploy.export.vae import export_vae_decoder_onnx
    from ditdeploy.sources.checkpoints import save_safetensors

    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "digits.xml").exists():
        export_openvino(shipped.DIGITS_ONNX, cache / "digits.xml")
    lt = cache / "latent"
    if not (lt / "lt.xml").exists():
        lt.mkdir(exist_ok=True)
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=32).eval()
        vae.save_pretrained(lt / "vae_dir")
        export_vae_decoder_onnx(vae, lt / "vae.onnx", latent_sizes=(4,), batch_sizes=(1, 2))
        cfg = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        num_classes=5, variant="tiny-latent", space="latent")
        model = random_model(cfg, seed=1)
        save_safetensors(model, lt / "lt.safetensors", cfg)
        export_denoiser_onnx(model, lt / "lt.onnx", decoder="vae.onnx")
        export_openvino(lt / "lt.onnx", lt / "lt.xml")
    return {
        "digits": {"torch": shipped.DIGITS_CHECKPOINT, "onnxruntime": shipped.DIGITS_ONNX,
                   "openvino": cache / "digits.xml", "torch_vae": None},
        "tiny-latent": {"torch": lt / "lt.safetensors", "onnxruntime": lt / "lt.onnx", "openvino": lt / "lt.xml",
                        "torch_vae": lt / "vae_dir"},
    }


def main(argv: list[str] | None = None) -> int:
    from ditdeploy.artifact.files import tool_versions, write_json_atomic
    from ditdeploy.bench.machine import machine_info
    from ditdeploy.proof import distances
    from ditdeploy.run.generation import SampleRequest, generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ditdeploy-parity")
    ap.add_argument("--num-per-label", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results" / "backend_parity.json")
    a = ap.parse_args(argv)
    arts = build(a.cache)
    rows = []
    for model, art in arts.items():
        for method, steps in RUNS:
            imgs, names = {}, {}
            for backend in ("torch", "onnxruntime", "openvino"):
                out = a.cache / f"{model}-{backend}.npz"
                vae = art["torch_vae"] if backend == "torch" else None
                t0 = time.perf_counter()
                s = generate(SampleRequest(engine=art[backend], backend=backend, vae=vae, sampler=method,
                                           steps=steps, seed=a.seed, num_per_label=a.num_per_label,
                                           options={"threads": a.threads}, out=None, npz=out))
                names[backend] = s.backend
                with np.load(out) as z:
                    imgs[backend] = z["arr_0"]
                print(f"{model} {method} {steps} {backend}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            ref = imgs["torch"]
            for backend in ("onnxruntime", "openvino"):
                d = np.abs(imgs[backend].astype(np.int16) - ref.astype(np.int16))
                rows.append({"model": model, "method": method, "steps": steps, "backend": names[backend],
                             "reference": names["torch"], "images": int(len(ref)), "shape": list(ref.shape[1:]),
                             "psnr_db": distances.psnr(imgs[backend], ref), "max_abs_diff": int(d.max()),
                             "identical_pixels": float((d == 0).mean()),
                             "saturated_pixels": float(((ref == 0) | (ref == 255)).mean())})
                r = rows[-1]
                print(f"  vs torch {backend:12s} PSNR {r['psnr_db']:.2f} dB  max diff {r['max_abs_diff']}  "
                      f"identical {100 * r['identical_pixels']:.2f}%", file=sys.stderr)
    result = {"what": "uint8 image PSNR vs the torch backend, same checkpoint/seed/sampler/labels", "rows": rows,
              "min_psnr_db": min(r["psnr_db"] for r in rows), "seed": a.seed, "num_per_label": a.num_per_label,
              "threads": a.threads, "tools": tool_versions(), "loadavg_at_end": os.getloadavg(),
              "machine": machine_info(),
              "command": "python3 experiments/backend_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json_atomic(a.out, result)
    print(f"min PSNR {result['min_psnr_db']:.2f} dB -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
