"""The export stage: one descriptor per model (names, shapes, sample input), which each engine backend exports
in its own format (ONNX graphs, or torch.export programs for the compiled backend)."""
