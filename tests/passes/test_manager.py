"""The pass API: registry, options, pipelines, the pass manager's verification, printing, timing."""
import io
import sys
import textwrap

import numpy as np
import pytest

import lowbit
from lowbit import passes
from lowbit.ir import DType, Graph, TensorType, parse
from lowbit.passes import Pass, PassError, PassManager, PassVerificationError, parse_pipeline, register
from lowbit.passes import registry as pass_registry

GRAPH = """
graph "g" {
  input %x: f32[4]
  @one = const f32[] dense<1.0>
  %0 = identity(%x) : f32[4]
  %1 = add(%0, @one) : f32[4]
  %2 = add(%0, @one) : f32[4]
  %3 = mul(%1, %2) : f32[4]
  output "y" = %3
}
"""


@register("test-negate-outputs")
def negate_outputs(graph: Graph, *, times: int = 1, label: str = "neg") -> bool:
    """Append `times` negations to every output (a test pass with typed options)."""
    for _ in range(times):
        graph.set_outputs([(name, graph.add("neg", value, name=label))
                           for name, value in zip(graph.output_names, graph.outputs)])
    return times > 0


@register
class BreakTypes(Pass):
    """Corrupts the first node's result type (to test verification)."""

    name = "test-break-types"

    def run(self, graph: Graph) -> bool:
        graph.nodes[0].outputs[0].type = TensorType((99,), DType.f32)
        return True


def test_function_pass_options_are_typed_and_listed():
    cls = passes.get_pass("test-negate-outputs")
    assert cls.options() == {"times": (int, 1), "label": (str, "neg")}
    assert cls.summary() == "Append `times` negations to every output (a test pass with typed options)."
    instance = passes.make_pass("test-negate-outputs", {"times": "2"})
    assert instance.times == 2 and instance.spec() == "test-negate-outputs{times=2}"


def test_pipeline_text_with_options_and_named_pipelines():
    pipeline = parse_pipeline("test-negate-outputs{times=3,label=n}, cleanup")
    assert [p.spec() for p in pipeline] == ["test-negate-outputs{times=3,label=n}", "fold-constants",
                                            "remove-noops", "cse", "dce"]


@pytest.mark.parametrize("text, message", [
    ("fold-constant", "unknown pass 'fold-constant'; did you mean 'fold-constants'"),
    ("test-negate-outputs{times=x}", "cannot read 'x' as int"),
    ("test-negate-outputs{color=red}", "has no option 'color'"),
    ("cse,,dce", "cannot parse pipeline"),
    ("test-negate-outputs{times}", "needs the form key=value"),
])
def test_bad_pipelines_say_what_is_wrong(text, message):
    with pytest.raises(PassError, match=message):
        parse_pipeline(text)


def test_manager_runs_and_reports_change():
    graph = parse(GRAPH)
    assert PassManager("remove-noops,cse,dce").run(graph)
    assert graph.op_histogram() == {"add": 1, "mul": 1}
    assert not PassManager("remove-noops,cse,dce").run(graph)


def test_verification_failure_names_the_pass_and_keeps_ir():
    graph = parse(GRAPH)
    with pytest.raises(PassVerificationError) as error:
        PassManager("cse,test-break-types").run(graph)
    assert error.value.pass_name == "test-break-types"
    assert "after pass 'test-break-types'" in str(error.value)
    assert "identity(%x) : f32[4]" in error.value.before and "f32[99]" in error.value.after


def test_print_ir_after_changes_and_timing():
    stream = io.StringIO()
    PassManager("remove-noops,cse,dce", print_ir="changed", timing=True, stream=stream).run(parse(GRAPH))
    text = stream.getvalue()
    assert text.count("// ----- IR after") == 2  # remove-noops and cse change the graph, dce does not
    assert "IR after cse -----" in text and "pass timing" in text and "(no change)" in text


def test_fixed_point_repeats_until_nothing_changes():
    counter = {"runs": 0}

    @register("test-count-down")
    def count_down(graph: Graph) -> bool:
        counter["runs"] += 1
        return counter["runs"] < 3

    PassManager("test-count-down", fixed_point=True).run(parse(GRAPH))
    assert counter["runs"] == 3


def test_optimize_returns_a_transformed_copy_with_equal_results():
    graph = parse(GRAPH)
    optimized = lowbit.optimize(graph, "default")
    assert len(graph.nodes) == 4 and len(optimized.nodes) == 2
    feeds = {"x": np.array([1, -2, 3, 0.5], np.float32)}
    np.testing.assert_array_equal(lowbit.run_reference(optimized, feeds)["y"],
                                  lowbit.run_reference(graph, feeds)["y"])


def test_pass_names_must_be_kebab_case():
    with pytest.raises(PassError, match="kebab-case"):
        register("Bad_Name")(lambda graph: False)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A distribution on sys.path declaring the `lowbit.passes` entry-point group adds its pass."""
    (tmp_path / "lowbit_test_plugin.py").write_text(textwrap.dedent('''
        from lowbit.passes import register

        @register("plugin-double")
        def plugin_double(graph, *, factor: float = 2.0) -> bool:
            """Multiply every output by `factor`."""
            import numpy as np
            scale = graph.add_constant(np.asarray(factor, np.float32), "factor")
            graph.set_outputs([(n, graph.add("mul", v, scale)) for n, v in zip(graph.output_names, graph.outputs)])
            return True
    '''))
    info = tmp_path / "lowbit_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lowbit-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[lowbit.passes]\nplugin-double = lowbit_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pass_registry, "_entry_points_loaded", False)
    monkeypatch.delitem(sys.modules, "lowbit_test_plugin", raising=False)
    assert "plugin-double" in passes.registered_passes()
    graph = parse(GRAPH)
    PassManager("plugin-double{factor=3}").run(graph)
    result = lowbit.run_reference(graph, {"x": np.ones(4, np.float32)})["y"]
    np.testing.assert_array_equal(result, np.full(4, 12.0, np.float32))
