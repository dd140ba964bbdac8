"""`sparsify`: give sufficiently sparse constant weights a sparse layout in their type, so that kernel
selection sees it. The constant keeps its dense data (zeros included: kernels pack it themselves).

Layouts describe the weight matrix [outputs, K] of `layers` (for linear and conv2d that is the stored
tensor flattened after axis 0; for matmul(x, W) it is Wᵀ):
- `nm` (n, m) when every group of m consecutive weights along K has at most n nonzeros;
- `bsr` (block r×c) when the zeros come in whole blocks: at least `min_sparsity` of the blocks are all
  zero;
- `csr` otherwise, when at least `min_sparsity` of the weights are zero.
`format=auto` tries them in that order and takes a structured layout (nm, bsr) only when its pattern
accounts for at least `STRUCTURED_SHARE` of the zeros (an 80%-sparse unstructured matrix may satisfy 4:8
by chance, but CSR skips more); `csr`, `bsr` or `nm` asks for one (a layer that does not fit keeps its
dense type). The pattern a pruning pass recorded in `graph.metadata["pruning"]` is tried first.
Quantized weights (qconv2d, qlinear, dynamic_linear) count as zero where they equal their zero point,
which must be 0 (symmetric weights).
"""
from __future__ import annotations

import numpy as np

from lowbit.ir import Graph, TensorType
from lowbit.ir.types import SparseLayout
from lowbit.passes.prune.layers import WEIGHT_OPERAND, PruneError, WeightLayer, check_fraction, record, weight_layer
from lowbit.passes.prune.patterns import zero_block_fraction
from lowbit.passes.registry import register

FORMATS = ("auto", "csr", "bsr", "nm")
BLOCKS = ((4, 4), (1, 16), (16, 1), (2, 8), (8, 2), (1, 8), (8, 1), (2, 4), (4, 2), (2, 2), (1, 4), (4, 1),
          (1, 2), (2, 1))
NM_GROUPS = (4, 8, 16)
STRUCTURED_SHARE = 0.9


@register("sparsify")
def sparsify(graph: Graph, *, min_sparsity: float = 0.5, format: str = "auto") -> bool:
    """Give constant weights with at least `min_sparsity` zeros a sparse layout (`format`: auto, csr, bsr
    or nm) in their type; the data stays dense."""
    check_fraction(min_sparsity, "sparsify: min_sparsity")
    if format not in FORMATS:
        raise PruneError(f"sparsify: format must be one of {', '.join(FORMATS)}, not {format!r}")
    changed = False
    records = graph.metadata.get("pruning", {})
    for node in graph.nodes:
        layer = weight_layer(node, (*WEIGHT_OPERAND, "matmul"), float_only=False)
        if layer is None or not _zero_is_zero(layer):
            continue
        layout = choose_layout(layer.matrix(), min_sparsity, format, records.get(layer.name, {}))
        weight = layer.weight
        if layout != weight.type.layout:
            weight.type = TensorType(weight.type.shape, weight.type.dtype, weight.type.quant, layout)
            record(graph, layer.name, {"layout": str(layout) if layout else "dense"})
            changed = True
    return changed


def _zero_is_zero(layer: WeightLayer) -> bool:
    quant = layer.weight.type.quant
    return quant is None or not any(quant.zero_point)


def choose_layout(matrix: np.ndarray, min_sparsity: float, format: str = "auto",
                  hint: dict | None = None) -> SparseLayout | None:
    """The sparse layout for a weight matrix [outputs, K], or None to keep it dense."""
    hint = hint or {}
    zeros = float(np.mean(matrix == 0)) if matrix.size else 0.0
    if zeros < min_sparsity or zeros == 0:
        return None
    if format in ("auto", "nm"):
        groups = ([hint["m"]] if hint.get("pattern") == "nm" else []) + list(NM_GROUPS)
        for m in groups:
            if matrix.shape[1] % m == 0:
                n = int(np.count_nonzero(matrix.reshape(matrix.shape[0], -1, m), axis=-1).max(initial=0))
                share = (1 - n / m) / zeros
                if 0 < n < m and 1 - n / m >= min_sparsity and (format == "nm" or share >= STRUCTURED_SHARE):
                    return SparseLayout("nm", n=n, m=m)
    if format in ("auto", "bsr"):
        blocks = ([tuple(hint["block"])] if hint.get("pattern") == "block" else []) + list(BLOCKS)
        for block in blocks:
            empty = zero_block_fraction(matrix, block)
            # empty / zeros: the share of all zeros that lie in all-zero blocks.
            if empty >= min_sparsity and (format == "bsr" or empty / zeros >= STRUCTURED_SHARE):
                return SparseLayout("bsr", tuple(block))
    if format in ("auto", "csr"):
        return SparseLayout("csr")
    return None
