"""A 2-layer BERT-style encoder (opset 17) against onnxruntime, clean and as exporters write it."""
import numpy as np
import pytest

from harness import check_model
from model_builders import bert_encoder

SEQ = 16
VOCAB = 120


def bert_feeds(rng, seq: int = SEQ, padding: int = 4) -> dict[str, np.ndarray]:
    mask = np.ones((1, seq), np.int64)
    mask[:, seq - padding:] = 0
    return {"input_ids": rng.integers(0, VOCAB, (1, seq), dtype=np.int64), "attention_mask": mask}


@pytest.mark.parametrize("exporter_style", [False, True], ids=["clean", "exporter"])
def test_bert_encoder(rng, exporter_style):
    check_model(bert_encoder(seq=SEQ, vocab=VOCAB, exporter_style=exporter_style), bert_feeds(rng))


def test_bert_encoder_longer_sequence(rng):
    check_model(bert_encoder(seq=32, vocab=VOCAB, exporter_style=True), bert_feeds(rng, seq=32, padding=9))


def test_exporter_shape_arithmetic_folds_away(rng):
    """Shape→Gather→Unsqueeze→Concat→Reshape chains, sliced position ids and Constant nodes fold into
    constants: the exporter-style graph has exactly the ops of the clean one."""
    clean = check_model(bert_encoder(seq=SEQ, vocab=VOCAB), bert_feeds(rng))
    exported = check_model(bert_encoder(seq=SEQ, vocab=VOCAB, exporter_style=True), bert_feeds(rng))
    assert exported.op_histogram() == clean.op_histogram()
