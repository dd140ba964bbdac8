"""Op declarations, one module per family; importing this package registers them all."""
from lowbit.ir.ops import attention, elementwise, nn, quantized, tensor  # noqa: F401
