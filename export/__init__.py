"""ditdeploy.export: turn a DiT into deployable artifacts (ONNX, OpenVINO IR, TensorRT, AOTInductor, ...)."""
