"""Artifacts on disk: atomic files, manifests, the output-path policy, formats and trust."""
