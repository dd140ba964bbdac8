"""Present-day networks written as their exporters write them (opset 17), with seeded random weights.

ResNet-18 and MobileNetV2 follow torchvision's layer lists; the BERT-style encoder follows
Hugging Face's BertModel as the TorchScript exporter writes it, in a clean form and in a form
with the exporter's run-time shape arithmetic, which lowbit must fold away.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnx_builder import OnnxBuilder


# -- ResNet-18 -------------------------------------------------------------------------------------
def resnet18(image: int = 224, width: int = 64, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """torchvision's resnet18: input `input` [1,3,image,image], output `logits` [1,classes]."""
    b = OnnxBuilder("resnet18", seed=seed)
    x = b.input("input", [1, 3, image, image])
    h = b.op("Relu", [b.batch_norm(b.conv(x, 3, width, 7, stride=2, bias=False), width)])
    h = b.pool("MaxPool", h, 3, stride=2, pad=1)
    channels = width
    for stage in range(4):
        out_channels = width * 2 ** stage
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _basic_block(b, h, channels, out_channels, stride)
            channels = out_channels
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    b.op("Gemm", [h, b.he([classes, channels], channels, "fc_w"), b.normal([classes], 0.05, "fc_b")],
         ["logits"], transB=1)
    return b.model(["logits"])


def _basic_block(b: OnnxBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    h = b.op("Relu", [b.batch_norm(b.conv(x, cin, cout, 3, stride=stride, bias=False), cout)])
    # A small last gamma, as trained residual networks have, keeps the residual sum from growing.
    h = b.batch_norm(b.conv(h, cout, cout, 3, bias=False), cout, gamma=(0.2, 0.5))
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = b.batch_norm(b.conv(x, cin, cout, 1, stride=stride, pad=0, bias=False), cout)
    return b.op("Relu", [b.op("Add", [h, shortcut])])


# -- MobileNetV2 -----------------------------------------------------------------------------------
# (expansion t, output channels c, repeats n, first stride s) of torchvision's mobilenet_v2.
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(image: int = 96, classes: int = 1000, seed: int = 1) -> onnx.ModelProto:
    """torchvision's mobilenet_v2 (width 1.0): input `input` [1,3,image,image], output `logits`."""
    b = OnnxBuilder("mobilenet_v2", seed=seed)
    low, high = b.const(np.float32(0.0), "relu6_min"), b.const(np.float32(6.0), "relu6_max")

    def conv_bn(x: str, cin: int, cout: int, kernel: int, stride: int = 1, group: int = 1,
                relu6: bool = True) -> str:
        h = b.batch_norm(b.conv(x, cin, cout, kernel, stride=stride, group=group, bias=False), cout)
        return b.op("Clip", [h, low, high]) if relu6 else h

    h = conv_bn(b.input("input", [1, 3, image, image]), 3, 32, 3, stride=2)
    channels = 32
    for expansion, out_channels, repeats, first_stride in MOBILENET_V2_SETTINGS:
        for index in range(repeats):
            stride = first_stride if index == 0 else 1
            hidden = channels * expansion
            y = conv_bn(h, channels, hidden, 1) if expansion != 1 else h
            y = conv_bn(y, hidden, hidden, 3, stride=stride, group=hidden)
            y = conv_bn(y, hidden, out_channels, 1, relu6=False)
            h = b.op("Add", [h, y]) if stride == 1 and channels == out_channels else y
            channels = out_channels
    h = conv_bn(h, channels, 1280, 1)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    b.op("Gemm", [h, b.normal([classes, 1280], 0.05, "fc_w"), b.normal([classes], 0.05, "fc_b")],
         ["logits"], transB=1)
    return b.model(["logits"])


# -- BERT-style encoder ----------------------------------------------------------------------------
def bert_encoder(seq: int = 16, hidden: int = 64, heads: int = 4, layers: int = 2, vocab: int = 120,
                 exporter_style: bool = False, seed: int = 2) -> onnx.ModelProto:
    """A BertModel: inputs `input_ids`, `attention_mask` (int64 [1,seq]); outputs `last_hidden_state`
    [1,seq,hidden] and `pooler_output` [1,hidden].

    `exporter_style` writes what the TorchScript exporter writes: Constant nodes, position ids
    sliced to the run-time sequence length, head reshapes whose target shapes are computed with
    Shape→Gather→Unsqueeze→Concat, and a mask scaled by float32's minimum instead of -10000.
    """
    b = _BertBuilder(hidden, heads, exporter_style, seed)
    ids = b.input("input_ids", [1, seq], TensorProto.INT64)
    mask = b.input("attention_mask", [1, seq], TensorProto.INT64)
    h = b.embeddings(ids, vocab, seq)
    bias = b.attention_bias(mask)
    for _ in range(layers):
        h = b.layer(h, bias)
    b.op("Identity", [h], ["last_hidden_state"])
    first = b.op("Gather", [h, b.scalar(0, np.int64)], axis=1)
    b.op("Tanh", [b.linear(first, hidden, hidden)], ["pooler_output"])
    return b.model(["last_hidden_state", "pooler_output"])


class _BertBuilder(OnnxBuilder):
    """The pieces of a BERT encoder layer."""

    def __init__(self, hidden: int, heads: int, exporter_style: bool, seed: int) -> None:
        super().__init__("bert_exporter_style" if exporter_style else "bert", seed=seed)
        self.hidden = hidden
        self.heads = heads
        self.exporter_style = exporter_style

    def scalar(self, value: float | int, dtype: type = np.float32) -> str:
        """A scalar: a Constant node in exporter style (as torch writes them), else an initializer."""
        data = np.asarray(value, dtype=dtype)
        if self.exporter_style:
            return self.op("Constant", [], value=onnx.numpy_helper.from_array(data, self.fresh("constant")))
        return self.const(data, "scalar")

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        """MatMul + Add with the weight stored [in, out], as torch exports nn.Linear on 3-D inputs."""
        weight = self.normal([fan_in, fan_out], 1.0 / np.sqrt(fan_in), "linear_w")
        return self.op("Add", [self.op("MatMul", [x, weight]), self.normal([fan_out], 0.05, "linear_b")])

    def layer_norm(self, x: str) -> str:
        gamma = self.uniform([self.hidden], 0.8, 1.2, "ln_scale")
        return self.op("LayerNormalization", [x, gamma, self.normal([self.hidden], 0.05, "ln_bias")],
                       axis=-1, epsilon=1e-12)

    def embeddings(self, ids: str, vocab: int, seq: int) -> str:
        words = self.op("Gather", [self.normal([vocab, self.hidden], 0.5, "word_embeddings"), ids])
        max_positions = 4 * seq
        position_table = self.normal([max_positions, self.hidden], 0.5, "position_embeddings")
        if self.exporter_style:
            # position_ids[:, :seq_len] of a registered buffer, seq_len read from input_ids at run time.
            buffer = self.const(np.arange(max_positions, dtype=np.int64)[None], "position_ids")
            length = self.op("Unsqueeze", [self.dim(ids, 1), self.const([0], "axes", np.int64)])
            positions = self.op("Slice", [buffer, self.const([0], "starts", np.int64), length,
                                          self.const([1], "axes", np.int64)])
        else:
            positions = self.const(np.arange(seq, dtype=np.int64)[None], "position_ids")
        token_types = self.const(np.zeros((1, seq), np.int64), "token_type_ids")
        h = self.op("Add", [words, self.op("Gather", [position_table, positions])])
        h = self.op("Add", [h, self.op("Gather", [self.normal([2, self.hidden], 0.5, "token_type_embeddings"),
                                                  token_types])])
        return self.layer_norm(h)

    def attention_bias(self, mask: str) -> str:
        """(1 - mask[:, None, None, :]) * big_negative, as float32 [1,1,1,seq]."""
        extended = self.op("Unsqueeze", [mask, self.const([1, 2], "axes", np.int64)])
        extended = self.op("Cast", [extended], to=TensorProto.FLOAT)
        inverted = self.op("Sub", [self.scalar(1.0), extended])
        big_negative = np.finfo(np.float32).min if self.exporter_style else -10000.0
        return self.op("Mul", [inverted, self.scalar(big_negative)])

    def dim(self, x: str, axis: int) -> str:
        """Shape(x)[axis] as a 0-d int64 tensor (exporter style)."""
        return self.op("Gather", [self.op("Shape", [x]), self.scalar(axis, np.int64)], axis=0)

    def reshape(self, x: str, tail: list[int]) -> str:
        """x reshaped to [batch, seq] + tail; exporter style reads batch and seq from x's shape."""
        if not self.exporter_style:
            return self.op("Reshape", [x, self.const([1, -1] + tail, "shape", np.int64)])
        axes = self.const([0], "axes", np.int64)
        parts = [self.op("Unsqueeze", [self.dim(x, axis), axes]) for axis in (0, 1)]
        shape = self.op("Concat", parts + [self.const(tail, "shape_tail", np.int64)], axis=0)
        return self.op("Reshape", [x, shape])

    def layer(self, x: str, bias: str) -> str:
        hidden, heads = self.hidden, self.heads
        head_size = hidden // heads

        def split_heads(t: str, perm: list[int]) -> str:
            return self.op("Transpose", [self.reshape(t, [heads, head_size])], perm=perm)

        query = split_heads(self.linear(x, hidden, hidden), [0, 2, 1, 3])
        key_t = split_heads(self.linear(x, hidden, hidden), [0, 2, 3, 1])
        value = split_heads(self.linear(x, hidden, hidden), [0, 2, 1, 3])
        scores = self.op("Div", [self.op("MatMul", [query, key_t]), self.scalar(np.sqrt(head_size))])
        probs = self.op("Softmax", [self.op("Add", [scores, bias])], axis=-1)
        context = self.op("Transpose", [self.op("MatMul", [probs, value])], perm=[0, 2, 1, 3])
        context = self.reshape(context, [hidden])
        h = self.layer_norm(self.op("Add", [self.linear(context, hidden, hidden), x]))
        inner = self.linear(h, hidden, 4 * hidden)
        erf = self.op("Erf", [self.op("Div", [inner, self.scalar(np.sqrt(2.0))])])
        gelu = self.op("Mul", [self.op("Mul", [inner, self.op("Add", [erf, self.scalar(1.0)])]), self.scalar(0.5)])
        return self.layer_norm(self.op("Add", [self.linear(gelu, 4 * hidden, hidden), h]))
