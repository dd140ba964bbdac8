"""Byte copies between buffers (graph outputs that alias other buffers, materialised views)."""
from __future__ import annotations

from llvmlite import ir

from lowbit.kernels.llvm import I1, I8, I64, VOID, declare


def copy_kernel(module: ir.Module, name: str, nbytes: int) -> ir.Function:
    """`name(src, dst)`: copy `nbytes` bytes (the buffers never overlap)."""
    byte_ptr = I8.as_pointer()
    function = ir.Function(module, ir.FunctionType(VOID, [byte_ptr, byte_ptr]), name)
    function.linkage = "internal"
    source, destination = function.args
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    memcpy = declare(module, "llvm.memcpy.p0i8.p0i8.i64", VOID, byte_ptr, byte_ptr, I64, I1)
    builder.call(memcpy, [destination, source, ir.Constant(I64, nbytes), ir.Constant(I1, 0)])
    builder.ret_void()
    return function
