"""`ditdeploy fid`: FID / Inception Score (+ sFID, precision, recall) of a sample npz against a reference.

The sample npz is in the ADM layout. Thin wiring: flags -> ``ditdeploy.fid.FidRequest`` ->
``ditdeploy.fid.evaluate``. typer + stdlib at import.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ditdeploy.commands import _common as c


def _summary(report: dict) -> str:
    m = report["metrics"]
    parts = [f"FID {m['fid']:.4f}", f"IS {m['inception_score']:.3f}"]
    parts += [f"{k} {m[k]:.4f}" for k in ("sfid", "precision", "recall") if k in m]
    ref = report["reference"]
    ext = report["extractor"]
    return (" | ".join(parts) + f"  ({report['samples']['count']} samples vs {ref['name']}"
            + (f" ({ref['count']} images)" if "count" in ref else "") + f"; {ext['name']} sha256 {ext['sha256'][:12]})")


def register(app: typer.Typer) -> None:
    @app.command("fid")
    def fid(
        samples: Path = typer.Argument(..., help="Samples: .npz with arr_0 uint8 (N, H, W, C), e.g. from "
                                       "`ditdeploy sample --npz`."),
        ref: str = typer.Option(..., "--ref", help="Reference: an ADM reference batch .npz (arr_0 images and/or "
                                "mu/sigma), or 'digits' (the real 8x8 digits, offline extractor)."),
        inception: Path = typer.Option(None, "--inception", help="FID InceptionV3 weights (pytorch-fid's "
                                       "pt_inception-2015-12-05-6726825d.pth). Default: the cache "
                                       "($DITDEPLOY_CACHE or ~/.cache/ditdeploy)."),
        extractor: str = typer.Option("auto", "--extractor", help="auto (digits for --ref digits, else inception) | "
                                      "inception | digits (8x8 digits against an npz reference)."),
        batch_size: int = typer.Option(50, "--batch-size", min=1, help="Images per feature-extractor batch."),
        device: str = typer.Option("auto", "--device", help="Inception device: auto | cpu | cuda[:N]."),
        pr: bool = typer.Option(True, "--pr/--no-pr", help="Precision / recall (needs reference images; "
                                "O(N^2) distances)."),
        split_size: int = typer.Option(5000, "--split-size", min=1, help="Inception Score split size (ADM: 5000)."),
        json_out: Path = typer.Option(None, "--json", help="Also write the full report as JSON here."),
        progress: bool = c.progress_option(),
    ) -> None:
        """FID and Inception Score of SAMPLES against --ref (+ sFID / precision / recall when the reference
        carries what they need). Weights are never downloaded."""
        import json

        from ditdeploy.artifact.output_policy import check_outputs
        from ditdeploy.fid import DIGITS_REF, FidRequest, evaluate

        if json_out is not None:  # before any work: the report never replaces an input
            check_outputs({"SAMPLES": samples, "--ref": None if ref == DIGITS_REF else Path(ref),
                           "--inception": inception}, {"--json": json_out})
        req = FidRequest(samples=samples, ref=ref, inception=inception, batch_size=batch_size, device=device,
                         precision_recall=pr, split_size=split_size, extractor=extractor,
                         progress=c.progress_on(progress))
        report = evaluate(req)
        if json_out is not None:
            from ditdeploy.artifact.files import write_json_atomic

            write_json_atomic(json_out, report)
        typer.echo(_summary(report))
        if json_out is None:
            from ditdeploy.artifact.files import strict_json

            typer.echo(json.dumps(strict_json(report["metrics"]), sort_keys=True, allow_nan=False), err=True)
