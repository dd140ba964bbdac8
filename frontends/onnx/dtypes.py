"""ONNX element types and their lowbit counterparts."""
from __future__ import annotations

import onnx

from lowbit.errors import UnsupportedOpError
from lowbit.ir import DType

_ELEMENT_TYPES = {
    onnx.TensorProto.FLOAT: DType.f32,
    onnx.TensorProto.DOUBLE: DType.f64,
    onnx.TensorProto.FLOAT16: DType.f16,
    onnx.TensorProto.INT64: DType.i64,
    onnx.TensorProto.INT32: DType.i32,
    onnx.TensorProto.INT16: DType.i16,
    onnx.TensorProto.INT8: DType.i8,
    onnx.TensorProto.UINT64: DType.u64,
    onnx.TensorProto.UINT32: DType.u32,
    onnx.TensorProto.UINT16: DType.u16,
    onnx.TensorProto.UINT8: DType.u8,
    onnx.TensorProto.BOOL: DType.bool,
}
for _name, _dtype in (("INT4", DType.i4), ("UINT4", DType.u4)):
    if hasattr(onnx.TensorProto, _name):
        _ELEMENT_TYPES[getattr(onnx.TensorProto, _name)] = _dtype


def element_type(elem_type: int, where: str) -> DType:
    try:
        return _ELEMENT_TYPES[elem_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
            else str(elem_type)
        raise UnsupportedOpError(f"{where}: element type {name} is not supported by lowbit") from None
