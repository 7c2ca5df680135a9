"""ditdeploy.bench."""
