"""Serving: loading a model file, predicting, and exporting to ONNX."""
