"""ditdeploy.export."""
