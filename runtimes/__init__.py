"""ditdeploy.runtimes."""
