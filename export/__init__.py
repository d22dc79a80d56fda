"""The export stage: one descriptor per model, exported to fp32 ONNX graphs."""
