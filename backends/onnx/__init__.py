"""Export of lowbit graphs to standard ONNX: float ops as their ONNX counterparts, quantized parts in the
QDQ form (QuantizeLinear / DequantizeLinear around float ops) that other runtimes fuse into integer kernels."""
from lowbit.backends.onnx.export import export_onnx, to_onnx

__all__ = ["export_onnx", "to_onnx"]
