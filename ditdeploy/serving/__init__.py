"""``ditdeploy serve``: a Triton Inference Server with step-level batching across requests, and its client.

The server runs through PyTriton; the client (``sample --server``) talks to it. See docs/serving.md.
"""
