"""The reference interpreter: numpy implementations that define what every op means."""
from lowbit.backends.reference.interpreter import check_feeds, evaluate_node, run_reference
from lowbit.backends.reference.registry import IMPLEMENTATIONS, reference

__all__ = ["run_reference", "evaluate_node", "check_feeds", "reference", "IMPLEMENTATIONS"]
