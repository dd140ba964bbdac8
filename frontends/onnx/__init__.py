"""The ONNX frontend: ONNX models (opset 7 and newer) into lowbit IR."""
from lowbit.frontends.onnx.importer import import_model, load_model

__all__ = ["import_model", "load_model"]
