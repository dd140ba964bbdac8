"""Native lowerings by op family; importing this package fills the lowering table."""
from lowbit.backends.native.lowerings import tensor  # noqa: F401
