"""The one exception hierarchy of lowbit.

Every error a user can cause derives from `LowbitError`; messages name the node, op, input or file
involved. This module imports nothing so that every layer (the IR core included) can raise these.
"""


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class ModelFormatError(LowbitError):
    """A model or IR file is malformed: not ONNX, truncated, dangling names, missing initializers."""


class UnsupportedOpError(LowbitError):
    """An operator (or an attribute value of one) that lowbit does not implement."""


class ShapeError(LowbitError):
    """Shapes or dtypes do not fit an operator, or a feed does not fit the graph's input."""


class InputError(LowbitError):
    """Feeds given to a model are wrong: unknown or missing names, wrong shape or dtype."""


class VerificationError(LowbitError):
    """The IR breaks an invariant (SSA, use lists, types) — a bug in a pass or a hand-written graph."""


class ParseError(LowbitError):
    """The IR text form could not be parsed; the message gives line and column."""


class ArtifactError(LowbitError):
    """A compiled artifact (weights file, manifest, shared library) is corrupt or mismatched."""


class TargetError(LowbitError):
    """A code-generation target is unknown, or code for it cannot run on this machine."""
