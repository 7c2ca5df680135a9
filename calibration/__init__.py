"""ditdeploy.calibration: INT8 quantization of exported DiT denoisers and the calibration it needs."""
