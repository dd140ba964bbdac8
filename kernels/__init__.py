"""Code generators, one op family per module, for static shapes, dtypes and a `Target` (see llvm.py)."""
