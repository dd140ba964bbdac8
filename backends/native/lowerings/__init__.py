"""Native lowerings by op family; importing this package fills the lowering table."""
from lowbit.backends.native.lowerings import (elementwise, nn, quantized, quantized_products,  # noqa: F401
                                              reduce_norm, tensor)
