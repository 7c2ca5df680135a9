"""Proof: parity against the reference, comparison distances, the recipe tuner."""
