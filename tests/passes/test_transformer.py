"""LayerNorm, GELU and attention fusions: before/after text and numerical equivalence."""
import pytest
from equivalence import optimize_text
from filecheck import filecheck

LAYERNORM = """
graph "ln" {
  input %x: f32[2,5,8]
  @two = const f32[] dense<2.0>
  @eps = const f32[] dense<1e-05>
  @gamma = const f32[8] dense<[1.0, 0.5, 2.0, 1.5, 1.0, 0.25, 1.0, 3.0]>
  @beta = const f32[8] dense<[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]>
  %0 = reduce_mean(%x) {axes = [2]} : f32[2,5,1]
  %1 = sub(%x, %0) : f32[2,5,8]
  %2 = pow(%1, @two) : f32[2,5,8]
  %3 = reduce_mean(%2) {axes = [2]} : f32[2,5,1]
  %4 = add(%3, @eps) : f32[2,5,1]
  %5 = sqrt(%4) : f32[2,5,1]
  %6 = div(%1, %5) : f32[2,5,8]
  %7 = mul(%6, @gamma) : f32[2,5,8]
  %8 = add(%7, @beta) : f32[2,5,8]
  output "y" = %8
}
"""


def test_layernorm_fusion():
    _, after = optimize_text(LAYERNORM, "fuse-layernorm,dce")
    filecheck(str(after), """
    CHECK: input %x
    CHECK-NOT: reduce_mean
    CHECK: %0 = layer_norm(%x, @{{.*}}gamma, @{{.*}}beta) {epsilon = {{9.99999974[0-9]*e-06}}} : f32[2,5,8]
    CHECK-NEXT: output "y" = %0
    """)


def test_layernorm_over_another_axis_is_rejected_with_a_reason(caplog):
    text = LAYERNORM.replace("{axes = [2]} : f32[2,5,1]", "{axes = [1]} : f32[2,1,8]", 1)
    text = text.replace("%1 = sub(%x, %0) : f32[2,5,8]", "%1 = sub(%x, %0) : f32[2,5,8]")
    with caplog.at_level("DEBUG", logger="lowbit.passes"):
        _, after = optimize_text(text, "fuse-layernorm")
    assert "layer_norm" not in str(after)
    assert "the mean is not taken over the last axis alone" in caplog.text


@pytest.mark.parametrize("body", [
    # HF BERT: x * 0.5 * (1 + erf(x / sqrt(2)))
    """%0 = mul(%x, @half) : f32[3,4]
       %1 = div(%x, @sqrt2) : f32[3,4]
       %2 = erf(%1) : f32[3,4]
       %3 = add(%2, @one) : f32[3,4]
       %4 = mul(%0, %3) : f32[3,4]""",
    # torch.onnx export: ((erf(x / sqrt2) + 1) * x) * 0.5
    """%0 = div(%x, @sqrt2) : f32[3,4]
       %1 = erf(%0) : f32[3,4]
       %2 = add(@one, %1) : f32[3,4]
       %3 = mul(%x, %2) : f32[3,4]
       %4 = mul(%3, @half) : f32[3,4]""",
])
def test_gelu_erf_forms(body):
    text = f"""
    graph "g" {{
      input %x: f32[3,4]
      @half = const f32[] dense<0.5>
      @one = const f32[] dense<1.0>
      @sqrt2 = const f32[] dense<1.4142135>
      {body}
      output "y" = %4
    }}"""
    _, after = optimize_text(text, "fuse-gelu,dce")
    filecheck(str(after), "CHECK: %0 = gelu(%x) : f32[3,4]\nCHECK-NEXT: output")


def test_gelu_tanh_form():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[3,4]
      @half = const f32[] dense<0.5>
      @one = const f32[] dense<1.0>
      @three = const f32[] dense<3.0>
      @k = const f32[] dense<0.044715>
      @c = const f32[] dense<0.7978846>
      %0 = pow(%x, @three) : f32[3,4]
      %1 = mul(@k, %0) : f32[3,4]
      %2 = add(%x, %1) : f32[3,4]
      %3 = mul(%2, @c) : f32[3,4]
      %4 = tanh(%3) : f32[3,4]
      %5 = add(%4, @one) : f32[3,4]
      %6 = mul(%x, @half) : f32[3,4]
      %7 = mul(%6, %5) : f32[3,4]
      output "y" = %7
    }""", "fuse-gelu,dce")
    filecheck(str(after), 'CHECK: %0 = gelu(%x) {approximate = "tanh"}')


def test_gelu_with_shared_interior_value_is_not_fused():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[3,4]
      @half = const f32[] dense<0.5>
      @one = const f32[] dense<1.0>
      @sqrt2 = const f32[] dense<1.4142135>
      %0 = mul(%x, @half) : f32[3,4]
      %1 = div(%x, @sqrt2) : f32[3,4]
      %2 = erf(%1) : f32[3,4]
      %3 = add(%2, @one) : f32[3,4]
      %4 = mul(%0, %3) : f32[3,4]
      %5 = add(%4, %2) : f32[3,4]
      output "y" = %5
    }""", "fuse-gelu")
    assert "gelu" not in str(after)


ATTENTION = """
graph "attn" {
  input %q: f32[1,2,6,4]
  input %k: f32[1,2,6,4]
  input %v: f32[1,2,6,4]
  input %mask: f32[1,1,1,6]
  @d = const f32[] dense<2.0>
  %0 = transpose(%k) {perm = [0, 1, 3, 2]} : f32[1,2,4,6]
  %1 = matmul(%q, %0) : f32[1,2,6,6]
  %2 = div(%1, @d) : f32[1,2,6,6]
  %3 = add(%2, %mask) : f32[1,2,6,6]
  %4 = softmax(%3) {axis = 3} : f32[1,2,6,6]
  %5 = matmul(%4, %v) : f32[1,2,6,4]
  output "y" = %5
}
"""


def test_attention_fusion_with_mask_and_divisor():
    _, after = optimize_text(ATTENTION, "fuse-attention,dce")
    filecheck(str(after), """
    CHECK: %0 = transpose(%k)
    CHECK-NEXT: %1 = attention(%q, %0, %v, %mask) {scale = 0.5} : f32[1,2,6,4]
    CHECK-NEXT: output "y" = %1
    """)


def test_attention_without_mask_or_scale():
    text = ATTENTION.replace("%2 = div(%1, @d) : f32[1,2,6,6]\n  %3 = add(%2, %mask) : f32[1,2,6,6]\n  %4 = softmax(%3)",
                             "%4 = softmax(%1)")
    text = text.replace("  input %mask: f32[1,1,1,6]\n", "").replace("  @d = const f32[] dense<2.0>\n", "")
    _, after = optimize_text(text, "fuse-attention,dce")
    filecheck(str(after), "CHECK: attention(%q, %0, %v) : f32[1,2,6,4]")
