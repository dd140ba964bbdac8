"""lowbit's IR: values, nodes, graphs, types, the op registry, the text form and the verifier."""
from lowbit.ir import ops  # noqa: F401  (registers every op)
from lowbit.ir.dtypes import DType
from lowbit.ir.graph import ElidedData, Graph, Node, Value, constant_value
from lowbit.ir.parser import load, parse, save
from lowbit.ir.printer import print_graph
from lowbit.ir.registry import Attr, InferContext, OpDef, get_op, is_registered, register_op, registered_ops
from lowbit.ir.types import QuantParams, SparseLayout, TensorType
from lowbit.ir.verifier import verify

__all__ = [
    "DType", "TensorType", "QuantParams", "SparseLayout",
    "Value", "Node", "Graph", "ElidedData", "constant_value",
    "Attr", "OpDef", "InferContext", "register_op", "get_op", "is_registered", "registered_ops",
    "parse", "load", "save", "print_graph", "verify",
]
