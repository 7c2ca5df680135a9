"""`ditdeploy bench` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench() -> None:
        """Not implemented yet."""
        from ditdeploy.errors import DitDeployError

        raise DitDeployError("'bench' is not implemented yet")
