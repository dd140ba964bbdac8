"""Small versions of the ONNX model zoo's oldest CNNs, written at opsets 7, 8 and 9 as their
converters (Caffe2, CNTK, early PyTorch) wrote them.

Old-style details kept on purpose: an old IR version with every initializer repeated in graph.input,
Reshape with constant shapes holding 0 and -1, Dropout with its mask output, LRN, BatchNormalization-7
with `spatial=1`, Sum of several operands, Upsample (scales attribute at 7/8, input at 9), AveragePool
that excludes padding, asymmetric padding (explicit and SAME_UPPER), and Softmax on 4-D tensors with
the pre-13 meaning (the tensor is coerced to 2-D at `axis`). The input is `data_0` and the output
`prob_1`, as in the zoo.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from onnx_builder import OnnxBuilder

OPSETS = (7, 8, 9)


def _start(name: str, opset: int, image: int, seed: int) -> tuple[OnnxBuilder, str]:
    b = OnnxBuilder(f"{name}_opset{opset}", opset=opset, seed=seed)
    return b, b.input("data_0", [1, 3, image, image])


def _finish(b: OnnxBuilder, logits: str, check: bool = True) -> onnx.ModelProto:
    b.op("Softmax", [logits], ["prob_1"])
    return b.model(["prob_1"], old_style=True, check=check)


def _relu(b: OnnxBuilder, x: str) -> str:
    return b.op("Relu", [x])


def _lrn(b: OnnxBuilder, x: str) -> str:
    # Caffe's AlexNet parameters, with alpha raised so the normalisation visibly changes values.
    return b.op("LRN", [x], size=5, alpha=1e-2, beta=0.75, bias=1.0)


def _dropout(b: OnnxBuilder, x: str) -> str:
    output, _mask = b.op("Dropout", [x], 2, ratio=0.5)
    return output


def _reshape(b: OnnxBuilder, x: str, shape: list[int]) -> str:
    return b.op("Reshape", [x, b.const(np.asarray(shape, np.int64), "shape")])


# -- AlexNet / ZFNet -------------------------------------------------------------------------------
def alexnet(opset: int, zfnet: bool = False, gemm_broadcast_attr: bool = False) -> onnx.ModelProto:
    """bvlc_alexnet (or zfnet512 with `zfnet`) at a tenth of the width.

    `gemm_broadcast_attr` adds the `broadcast=1` attribute Gemm had before opset 7, as some
    converters kept writing; such a model is not valid ONNX, so it is not checked.
    """
    kernel, stride, pad, image = (7, 2, 1, 61) if zfnet else (11, 4, 0, 115)
    b, x = _start("zfnet512" if zfnet else "bvlc_alexnet", opset, image, seed=10 + zfnet)
    h = b.pool("MaxPool", _lrn(b, _relu(b, b.conv(x, 3, 24, kernel, stride=stride, pad=pad))), 3, stride=2)
    h = b.pool("MaxPool", _lrn(b, _relu(b, b.conv(h, 24, 64, 5, group=2))), 3, stride=2)
    h = _relu(b, b.conv(h, 64, 96, 3))
    h = _relu(b, b.conv(h, 96, 96, 3, group=2))
    h = b.pool("MaxPool", _relu(b, b.conv(h, 96, 64, 3, group=2)), 3, stride=2)
    h = _reshape(b, h, [0, -1])
    extra = {"broadcast": 1} if gemm_broadcast_attr else {}
    h = _dropout(b, _relu(b, b.gemm(h, 64 * 2 * 2, 128, **extra)))
    h = _dropout(b, _relu(b, b.gemm(h, 128, 128, **extra)))
    return _finish(b, b.gemm(h, 128, 10, **extra), check=not gemm_broadcast_attr)


def without_gemm_broadcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with Gemm's pre-opset-7 `broadcast` attribute removed (for onnxruntime)."""
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    for node in clean.graph.node:
        kept = [a for a in node.attribute if not (node.op_type == "Gemm" and a.name == "broadcast")]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.checker.check_model(clean, full_check=True)
    return clean


# -- SqueezeNet ------------------------------------------------------------------------------------
def squeezenet(opset: int) -> onnx.ModelProto:
    """squeezenet1.1: fire modules (squeeze 1×1, expand 1×1 and 3×3 joined by Concat)."""
    b, x = _start("squeezenet1.1", opset, 64, seed=12)

    def fire(h: str, cin: int, squeeze: int, expand: int) -> str:
        s = _relu(b, b.conv(h, cin, squeeze, 1))
        return b.op("Concat", [_relu(b, b.conv(s, squeeze, expand, 1)), _relu(b, b.conv(s, squeeze, expand, 3))],
                    axis=1)

    h = b.pool("MaxPool", _relu(b, b.conv(x, 3, 32, 3, stride=2, pad=0)), 3, stride=2)
    h = fire(fire(h, 32, 16, 32), 64, 16, 32)
    h = fire(b.pool("MaxPool", h, 3, stride=2), 64, 32, 64)
    h = _relu(b, b.conv(_dropout(b, h), 128, 10, 1))
    # The zoo's SqueezeNet ends in a [1,10,1,1] tensor given straight to Softmax.
    return _finish(b, b.pool("AveragePool", h, 7))


# -- GoogLeNet / Inception v1 ----------------------------------------------------------------------
def inception_v1(opset: int) -> onnx.ModelProto:
    """The GoogLeNet stem and two inception blocks (1×1, 3×3, 5×5 and pool branches joined by Concat)."""
    b, x = _start("inception_v1", opset, 64, seed=13)
    asymmetric = [0, 0, 1, 1]  # Caffe's ceil-mode pooling, as the converters wrote it
    h = _relu(b, b.conv(x, 3, 32, 7, stride=2))
    h = _lrn(b, b.op("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=asymmetric))
    h = _relu(b, b.conv(_relu(b, b.conv(h, 32, 32, 1)), 32, 96, 3))
    h = b.op("MaxPool", [_lrn(b, h)], kernel_shape=[3, 3], strides=[2, 2], pads=asymmetric)

    def block(h: str, cin: int, widths: tuple[int, int, int, int, int, int], pool: str) -> tuple[str, int]:
        one, three_reduce, three, five_reduce, five, pool_proj = widths
        branches = [
            _relu(b, b.conv(h, cin, one, 1)),
            _relu(b, b.conv(_relu(b, b.conv(h, cin, three_reduce, 1)), three_reduce, three, 3)),
            _relu(b, b.conv(_relu(b, b.conv(h, cin, five_reduce, 1)), five_reduce, five, 5)),
            _relu(b, b.conv(b.pool(pool, h, 3, pad=1), cin, pool_proj, 1)),
        ]
        return b.op("Concat", branches, axis=1), one + three + five + pool_proj

    h, channels = block(h, 96, (32, 48, 64, 8, 16, 16), "MaxPool")
    h, channels = block(h, channels, (48, 48, 64, 16, 32, 16), "AveragePool")  # padding excluded
    h = _dropout(b, b.pool("AveragePool", h, 8))
    return _finish(b, b.gemm(_reshape(b, h, [1, -1]), channels, 10))


# -- DenseNet --------------------------------------------------------------------------------------
def densenet(opset: int) -> onnx.ModelProto:
    """densenet121's pattern: dense blocks of BN-ReLU-Conv layers joined by Concat, and transitions."""
    b, x = _start("densenet", opset, 32, seed=14)
    spatial = {"spatial": 1} if opset < 9 else {}  # BatchNormalization-7 wrote it explicitly

    def bn_relu_conv(h: str, cin: int, cout: int, kernel: int) -> str:
        return b.conv(_relu(b, b.batch_norm(h, cin, **spatial)), cin, cout, kernel, bias=False)

    def dense_block(h: str, channels: int, layers: int = 3, growth: int = 8) -> tuple[str, int]:
        for _ in range(layers):
            new = bn_relu_conv(bn_relu_conv(h, channels, 4 * growth, 1), 4 * growth, growth, 3)
            h = b.op("Concat", [h, new], axis=1)
            channels += growth
        return h, channels

    h, channels = dense_block(b.conv(x, 3, 16, 3, bias=False), 16)
    h = b.pool("AveragePool", bn_relu_conv(h, channels, channels // 2, 1), 2, stride=2)
    h, channels = dense_block(h, channels // 2)
    h = b.op("GlobalAveragePool", [_relu(b, b.batch_norm(h, channels, **spatial))])
    return _finish(b, b.gemm(b.op("Flatten", [h]), channels, 10))


# -- ShuffleNet ------------------------------------------------------------------------------------
def shufflenet(opset: int, groups: int = 3) -> onnx.ModelProto:
    """ShuffleNet v1 units: grouped 1×1 convs, channel shuffle (Reshape/Transpose/Reshape), depthwise
    3×3, and either a residual Add or (stride 2) Concat with an average-pooled shortcut."""
    b, x = _start("shufflenet", opset, 64, seed=15)

    def shuffle(h: str, channels: int, size: int) -> str:
        h = _reshape(b, h, [0, groups, -1, size, size])
        return _reshape(b, b.op("Transpose", [h], perm=[0, 2, 1, 3, 4]), [0, -1, size, size])

    def unit(h: str, cin: int, cout: int, stride: int, size: int) -> str:
        bottleneck = cout // 4
        branch_out = cout - cin if stride == 2 else cout
        first_groups = 1 if cin == 24 else groups
        y = _relu(b, b.batch_norm(b.conv(h, cin, bottleneck, 1, group=first_groups, bias=False), bottleneck))
        y = shuffle(y, bottleneck, size)
        y = b.conv(y, bottleneck, bottleneck, 3, stride=stride, group=bottleneck, bias=False)
        y = b.batch_norm(y, bottleneck)
        y = b.batch_norm(b.conv(y, bottleneck, branch_out, 1, group=groups, bias=False), branch_out, gamma=(0.2, 0.5))
        if stride == 2:
            return _relu(b, b.op("Concat", [b.pool("AveragePool", h, 3, stride=2, pad=1), y], axis=1))
        return _relu(b, b.op("Add", [h, y]))

    # tf2onnx-style SAME_UPPER padding: on an even size with stride 2 it pads only at the end.
    h = b.pool("MaxPool", _relu(b, b.conv(x, 3, 24, 3, stride=2)), 3, stride=2, auto_pad="SAME_UPPER")
    h = unit(unit(h, 24, 240, 2, 16), 240, 240, 1, 8)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    return _finish(b, b.gemm(h, 240, 10))


# -- VGG -------------------------------------------------------------------------------------------
def vgg(opset: int) -> onnx.ModelProto:
    """vgg16's pattern: stacks of 3×3 convs and 2×2 max pools, Flatten, fully connected layers (the
    first as Gemm with an [in, out] weight, the last as MatMul + Add)."""
    b, x = _start("vgg", opset, 32, seed=16)
    h, channels = x, 3
    for width in (16, 32, 64):
        h = _relu(b, b.conv(_relu(b, b.conv(h, channels, width, 3)), width, width, 3))
        h = b.pool("MaxPool", h, 2, stride=2)
        channels = width
    h = _dropout(b, _relu(b, b.gemm(b.op("Flatten", [h]), channels * 16, 128, trans_b=False)))
    logits = b.op("Add", [b.op("MatMul", [h, b.he([128, 10], 128, "fc_w")]), b.normal([10], 0.05, "fc_b")])
    return _finish(b, logits)


# -- a segmentation-style head with Upsample and Sum -----------------------------------------------
def upsample_head(opset: int) -> onnx.ModelProto:
    """Encoder convs (the first with SAME_UPPER padding), nearest Upsample ×2, Sum with a skip branch
    (and, from opset 8 where Sum broadcasts, a per-channel bias), and a Softmax over the whole
    coerced [1, C·H·W]."""
    b, x = _start("upsample_head", opset, 32, seed=17)
    skip = _relu(b, b.op("Conv", [x, b.he([16, 3, 3, 3], 27, "conv_w")], kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"))  # no padding before, one after
    deep = _relu(b, b.conv(skip, 16, 16, 3, stride=2))

    def upsample(h: str) -> str:
        scales = [1.0, 1.0, 2.0, 2.0]
        if opset < 9:
            return b.op("Upsample", [h], mode="nearest", scales=scales)
        return b.op("Upsample", [h, b.const(np.asarray(scales, np.float32), "scales")], mode="nearest")

    terms = [upsample(deep), skip, b.conv(skip, 16, 16, 1)]
    if opset >= 8:
        terms.append(b.normal([16, 1, 1], 0.5, "bias"))
    h = _relu(b, b.op("Sum", terms))
    return _finish(b, b.conv(upsample(h), 16, 4, 1))


ZOO_MODELS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "alexnet": alexnet,
    "zfnet": lambda opset: alexnet(opset, zfnet=True),
    "squeezenet": squeezenet,
    "inception_v1": inception_v1,
    "densenet": densenet,
    "shufflenet": shufflenet,
    "vgg": vgg,
    "upsample_head": upsample_head,
}
