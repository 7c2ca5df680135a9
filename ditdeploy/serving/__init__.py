"""``ditdeploy serve``: a Triton Inference Server (through PyTriton) with step-level batching across requests, and
the client that talks to it (``sample --server``). See docs/serving.md."""
