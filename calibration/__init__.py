"""ditdeploy.calibration."""
