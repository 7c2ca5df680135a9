"""`ditdeploy info`: versions, available backends, variants, and what an artifact's manifest says."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        engine: Path = typer.Option(None, "--engine", "-e", help="An artifact (.onnx/.xml/.plan/.safetensors) "
                                    "whose manifest to show."),
        artifact: Path = typer.Argument(None, hidden=True, help="Old spelling of --engine."),
    ) -> None:
        """Show versions, available runtimes and variants, or an artifact's manifest."""
        from ditdeploy.commands._common import deprecated

        artifact = deprecated("the positional ARTIFACT", "--engine", artifact, engine)
        from ditdeploy import __version__
        from ditdeploy.artifact.files import json_text
        from ditdeploy.artifact.manifest import load_manifest
        from ditdeploy.runtimes.registry import backends, tool_versions

        if artifact is not None:
            m = load_manifest(artifact, verify=True)
            typer.echo(json_text(m), nl=False)  # strict JSON (a NaN a manifest holds is printed as null)
            return
        typer.echo(f"ditdeploy {__version__}")
        for k, v in tool_versions().items():
            typer.echo(f"  {k:16s} {v}")
        typer.echo("runtimes:")
        for name, spec in backends().items():
            typer.echo(f"  {name:16s} {'available' if spec.installed() else 'not installed'}")
        from ditdeploy.config.variants import VARIANTS

        typer.echo("variants: " + ", ".join(VARIANTS))
