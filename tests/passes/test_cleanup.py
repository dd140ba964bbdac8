"""Before/after tests of the clean-up passes, each also checked numerically."""
from equivalence import optimize_text
from filecheck import filecheck


def test_fold_constants_evaluates_constant_subgraphs():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[3]
      @a = const f32[3] dense<[1.0, 2.0, 3.0]>
      @b = const f32[] dense<2.0>
      %0 = mul(@a, @b) : f32[3]
      %1 = exp(%0) : f32[3]
      %2 = add(%x, %1) : f32[3]
      output "y" = %2
    }""", "fold-constants")
    filecheck(str(after), """
    CHECK: input %x
    CHECK-NOT: mul
    CHECK: @exp = const f32[3] dense<[7.38{{[0-9]*}}, 54.59{{[0-9]*}}, 403.42{{[0-9]*}}]>
    CHECK-NOT: exp(
    CHECK: add(%x, @exp)
    """)


def test_fold_constants_respects_size_limit():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[64]
      @a = const f32[] dense<2.0>
      %0 = expand(@a) {shape = [64]} : f32[64]
      %1 = add(%x, %0) : f32[64]
      output "y" = %1
    }""", "fold-constants{max_elements=16}")
    filecheck(str(after), "CHECK: expand(@a)")


def test_dce_removes_unused_nodes_and_constants():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2]
      @unused = const f32[2] dense<[1.0, 2.0]>
      %0 = neg(%x) : f32[2]
      %1 = add(%0, @unused) : f32[2]
      %2 = relu(%x) : f32[2]
      output "y" = %2
    }""", "dce")
    filecheck(str(after), """
    CHECK-NOT: @unused
    CHECK-NOT: neg
    CHECK: relu(%x)
    CHECK-NEXT: output "y"
    """)


def test_cse_merges_equal_nodes_and_constants():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2]
      @a = const f32[] dense<3.0>
      @b = const f32[] dense<3.0>
      %0 = mul(%x, @a) : f32[2]
      %1 = mul(%x, @b) : f32[2]
      %2 = leaky_relu(%0) {alpha = 0.5} : f32[2]
      %3 = leaky_relu(%1) {alpha = 0.25} : f32[2]
      %4 = add(%2, %3) : f32[2]
      output "y" = %4
    }""", "cse")
    filecheck(str(after), """
    CHECK: @a = const
    CHECK-NOT: @b
    CHECK: %0 = mul(%x, @a)
    CHECK-NEXT: leaky_relu(%0) {alpha = 0.5}
    CHECK-NEXT: leaky_relu(%0) {alpha = 0.25}
    """)


def test_remove_noops_and_merge_chains():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2,3,4]
      %0 = identity(%x) : f32[2,3,4]
      %1 = reshape(%0) {shape = [2,3,4]} : f32[2,3,4]
      %2 = transpose(%1) {perm = [0, 2, 1]} : f32[2,4,3]
      %3 = transpose(%2) {perm = [2, 0, 1]} : f32[3,2,4]
      %4 = reshape(%3) {shape = [6, 4]} : f32[6,4]
      %5 = reshape(%4) {shape = [24]} : f32[24]
      %6 = cast(%5) {to = f32} : f32[24]
      %7 = relu(%6) : f32[24]
      output "y" = %7
    }""", "remove-noops")
    filecheck(str(after), """
    CHECK-NOT: identity
    CHECK: %0 = transpose(%x) {perm = [1, 0, 2]} : f32[3,2,4]
    CHECK-NEXT: %1 = reshape(%0) {shape = [24]} : f32[24]
    CHECK-NEXT: relu(%1)
    """)


def test_remove_noops_keeps_an_output_that_is_a_graph_input_copy():
    _, after = optimize_text("""
    graph "g" {
      input %x: f32[2]
      %0 = identity(%x) : f32[2]
      output "y" = %0
    }""", "remove-noops")
    filecheck(str(after), "CHECK: identity(%x)")
