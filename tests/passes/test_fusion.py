"""BatchNorm folding, MatMul+Add → linear, and epilogue fusion into conv2d / linear."""
import pytest
from equivalence import optimize_text
from filecheck import filecheck

CONV_BN = """
graph "g" {
  input %x: f32[1,2,5,5]
  @w = const f32[3,2,1,1] dense<[[[[0.5]], [[-1.0]]], [[[2.0]], [[0.25]]], [[[1.0]], [[1.0]]]]>
  @b = const f32[3] dense<[0.1, 0.2, 0.3]>
  @scale = const f32[3] dense<[1.5, 0.5, 2.0]>
  @shift = const f32[3] dense<[0.0, -1.0, 0.5]>
  @mean = const f32[3] dense<[0.2, 0.1, -0.3]>
  @var = const f32[3] dense<[1.0, 4.0, 0.25]>
  %0 = conv2d(%x, @w, @b) : f32[1,3,5,5]
  %1 = batch_norm(%0, @scale, @shift, @mean, @var) : f32[1,3,5,5]
  %2 = relu(%1) : f32[1,3,5,5]
  output "y" = %2
}
"""


def test_fold_batchnorm_into_conv():
    _, after = optimize_text(CONV_BN, "fold-batchnorm")
    filecheck(str(after), """
    CHECK-NOT: batch_norm
    CHECK: %0 = conv2d(%x, @conv2d.weight, @conv2d.bias) : f32[1,3,5,5]
    CHECK-NEXT: relu(%0)
    """)


def test_fold_batchnorm_refuses_when_conv_result_is_shared():
    text = CONV_BN.replace('output "y" = %2', 'output "y" = %2\n  output "z" = %0')
    _, after = optimize_text(text, "fold-batchnorm")
    filecheck(str(after), "CHECK: batch_norm")


def test_matmul_add_becomes_linear_with_bias():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2,4,3]
      @w = const f32[3,2] dense<[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]>
      @b = const f32[2] dense<[0.5, -0.5]>
      %0 = matmul(%x, @w) : f32[2,4,2]
      %1 = add(@b, %0) : f32[2,4,2]
      output "y" = %1
    }""", "fuse-linear,dce")
    filecheck(str(after), """
    CHECK: @linear.weight = const f32[2,3] dense<[[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]>
    CHECK: %0 = linear(%x, @linear.weight, @linear.bias) : f32[2,4,2]
    CHECK-NEXT: output "y" = %0
    """)


RESIDUAL_BLOCK = """
graph "g" {
  input %x: f32[1,2,4,4]
  @w = const f32[2,2,1,1] dense<[[[[0.5]], [[-1.0]]], [[[2.0]], [[0.25]]]]>
  @cb = const f32[1,2,1,1] dense<[[[[0.1]], [[-0.2]]]]>
  %0 = conv2d(%x, @w) : f32[1,2,4,4]
  %1 = add(%0, @cb) : f32[1,2,4,4]
  %2 = add(%1, %x) : f32[1,2,4,4]
  %3 = ACT : f32[1,2,4,4]
  output "y" = %3
}
"""


@pytest.mark.parametrize("act, fused", [
    ("relu(%2)", 'activation = "relu"'),
    ("clip(%2) {min = 0.0, max = 6.0}", 'activation = "clip", activation_params = [0.0, 6.0]'),
    ("leaky_relu(%2) {alpha = 0.125}", 'activation = "leaky_relu", activation_params = [0.125]'),
    ("sigmoid(%2)", 'activation = "sigmoid"'),
    ("hard_swish(%2)", 'activation = "hard_swish"'),
])
def test_epilogue_bias_residual_and_activation(act, fused):
    _, after = optimize_text(RESIDUAL_BLOCK.replace("ACT", act), "fuse-epilogue")
    filecheck(str(after), f"""
    CHECK: @conv2d.bias = const f32[2] dense<[0.1, -0.2]>
    CHECK: %0 = conv2d(%x, @w, @conv2d.bias, %x) {{{fused}}} : f32[1,2,4,4]
    CHECK-NEXT: output "y" = %0
    """)


def test_linear_epilogue_keeps_post_activation_add_separate():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2,3]
      input %r: f32[2,2]
      @w = const f32[2,3] dense<[[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]>
      %0 = linear(%x, @w) : f32[2,2]
      %1 = relu(%0) : f32[2,2]
      %2 = add(%1, %r) : f32[2,2]
      output "y" = %2
    }""", "fuse-epilogue")
    filecheck(str(after), """
    CHECK: %0 = linear(%x, @w) {activation = "relu"} : f32[2,2]
    CHECK-NEXT: %1 = add(%0, %r)
    """)
