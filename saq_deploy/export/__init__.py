"""ONNX export: fake-quant UNet -> Q/DQ ONNX for TensorRT and ONNX Runtime, and a Q/DQ lint.

Submodules import onnx/torch; this package imports nothing heavy."""
