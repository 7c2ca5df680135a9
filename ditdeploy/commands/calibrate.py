"""`ditdeploy calibrate` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate() -> None:
        """Not implemented yet."""
        from ditdeploy.errors import DitDeployError

        raise DitDeployError("'calibrate' is not implemented yet")
