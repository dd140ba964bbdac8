"""Pruning: weight pruning passes (magnitude, random, N:M, block) with the SparseGPT weight update,
structured filter pruning that shrinks the graph, and `sparsify`, which gives sparse weights a sparse
layout. See docs/pruning.md.

Passes: `prune-magnitude`, `prune-random`, `prune-nm`, `prune-block`, `prune-filters-l1`, `sparsify`.
"""
from lowbit.passes.prune.api import parse_prune_spec, prune
from lowbit.passes.prune.filters import prune_filters_l1
from lowbit.passes.prune.layers import PruneError, WeightLayer, select_layers, weight_layer
from lowbit.passes.prune.patterns import Pattern, satisfies_nm, zero_block_fraction
from lowbit.passes.prune.sparsegpt import sparsegpt
from lowbit.passes.prune.sparsify import choose_layout, sparsify
from lowbit.passes.prune.summary import LayerSummary, format_summary, pruning_summary, weight_sparsity
from lowbit.passes.prune.weights import BlockPruning, MagnitudePruning, NMPruning, RandomPruning, WeightPruning

__all__ = [
    "prune", "parse_prune_spec", "PruneError", "format_summary", "pruning_summary", "LayerSummary",
    "weight_sparsity", "MagnitudePruning", "RandomPruning", "NMPruning", "BlockPruning", "WeightPruning",
    "prune_filters_l1", "sparsify", "choose_layout", "sparsegpt", "Pattern", "satisfies_nm",
    "zero_block_fraction", "WeightLayer", "weight_layer", "select_layers",
]
