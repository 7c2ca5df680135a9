"""`ditdeploy train` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train() -> None:
        """Not implemented yet."""
        from ditdeploy.errors import DitDeployError

        raise DitDeployError("'train' is not implemented yet")
