"""ditdeploy's official-numerics DiT vs diffusers' ``DiTTransformer2DModel`` on identical weights, per timestep.

One randomly initialised model (every weight ~ N(0, 0.02); the released weights are not available offline) is mapped
into diffusers with ``ditdeploy.sources.diffusers_snapshot.from_official`` (``norm_eps`` 1e-5, the hub snapshots' default). Both
forwards run on the same x ~ N(0, 1) with labels (207, null); diffusers' two numerical differences are switched to
the official values in place (sinusoid divisor: ``time_proj.downscale_freq_shift`` 1 -> 0; MLP LayerNorm eps
1e-5 -> 1e-6) one at a time and together. Prints rel-L2 / max-abs of the output per timestep; docs/diffusers.md
records the results.

Run by hand (numerics only, seconds to a minute for S/2 / B/2):
``python -m experiments.diffusers_numerics --variant B/2``
"""

from __future__ import annotations

import argparse

CASES = {"as is": (False, False), "divisor fixed": (True, False), "eps fixed": (False, True),
         "both fixed": (True, True)}


def measure(variant: str, timesteps: tuple[int, ...] = (1, 10, 100, 500, 999)) -> dict[int, dict[str, tuple]]:
    """``{t: {case: (rel_l2, max_abs)}}`` for ``variant`` at 256 px."""
    import diffusers
    import torch

    from ditdeploy.config.variants import variant_config
    from ditdeploy.models import DiT
    from ditdeploy.sources import diffusers_snapshot

    torch.manual_seed(0)
    cfg = variant_config(variant, 256, num_classes=1000)
    net = DiT(**cfg.model_kwargs()).eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.02)
    net.config = cfg
    tr = diffusers.DiTTransformer2DModel(**(diffusers_snapshot.diffusers_config(cfg) | {"norm_eps": 1e-5})).eval()
    tr.load_state_dict(diffusers_snapshot.from_official(net.state_dict(), cfg), strict=True)
    x, y = torch.randn(2, 4, cfg.input_size, cfg.input_size), torch.tensor([207, 1000])
    out: dict[int, dict[str, tuple]] = {}
    for tv in timesteps:
        t = torch.full((2,), tv)
        out[tv] = {}
        with torch.no_grad():
            ours = net(x, t, y)
            for case, (div, eps) in CASES.items():
                for b in tr.transformer_blocks:
                    b.norm1.emb.time_proj.downscale_freq_shift = 0 if div else 1
                    b.norm3.eps = 1e-6 if eps else 1e-5
                o = tr(x, timestep=t, class_labels=y).sample
                out[tv][case] = (float((o - ours).norm() / ours.norm()), float((o - ours).abs().max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="S/2")
    args = ap.parse_args()
    print(f"{args.variant} | t | " + " | ".join(CASES))
    for tv, row in measure(args.variant).items():
        print(f"| {tv} | " + " | ".join(f"{r:.1e} / {m:.1e}" for r, m in row.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
