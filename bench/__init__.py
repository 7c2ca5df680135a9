"""ditdeploy.bench: benchmarks of artifacts per backend and batch, and load tests of a running server."""
