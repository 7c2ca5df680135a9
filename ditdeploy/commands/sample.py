"""`ditdeploy sample` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample() -> None:
        """Not implemented yet."""
        from ditdeploy.errors import DitDeployError

        raise DitDeployError("'sample' is not implemented yet")
