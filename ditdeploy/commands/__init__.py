"""CLI commands, one module each; every module exposes ``register(app)`` and imports heavy code lazily."""
