"""The TensorRT compatibility lint: real exported graphs pass; deliberately incompatible graphs fail."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen2edge.cli import TRT_TARGETS
from qwen2edge.trt.compat import ERROR, INFO, WARNING, check_bundle, lint_model
from qwen2edge.trt.support_matrix import TARGETS


def model(nodes, inputs, outputs, opset=17, inits=(), domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(g, opset_imports=imports)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def rules(report, severity=ERROR):
    return {f.rule for f in report.findings if f.severity == severity}


def test_cli_targets_are_the_matrix_targets():
    assert TRT_TARGETS == list(TARGETS)


def test_installed_version_maps_to_a_target():
    from qwen2edge.trt.support_matrix import target_for_version

    versions = [(10, 3, 0, 30), (10, 7, 0), (10, 13, 3), (10, 15, 1), (10, 16, 2, 10), (11, 4, 1)]
    assert [target_for_version(v) for v in versions] == \
        ["trt-10.3", "trt-10.3", "trt-10.13", "trt-10.13", "trt-10", "trt-11"]


def test_each_jetpack_has_its_own_target_with_its_tensorrt():
    """JetPack 6 = TensorRT 10.3, 7.0/7.1 = 10.13 (CUDA 13.0, Thor), 7.2 = 10.16 (CUDA 13.2, Orin and Thor)."""
    from qwen2edge.trt.support_matrix import JETPACK_TENSORRT

    assert JETPACK_TENSORRT == {"jetpack-6": (10, 3), "jetpack-7.0": (10, 13), "jetpack-7.2": (10, 16)}
    assert "TensorRT 10.13, CUDA 13.0" in TARGETS["jetpack-7.0"].label
    assert "TensorRT 10.16, CUDA 13.2" in TARGETS["jetpack-7.2"].label
    assert TARGETS["jetpack-6"].ops == TARGETS["trt-10.3"].ops
    assert TARGETS["jetpack-7.2"].ops == TARGETS["trt-10"].ops


@pytest.mark.parametrize("op, opset, since", [
    ("RMSNormalization", 23, "jetpack-7.2"),  # parser support from 10.15
    ("Attention", 23, "jetpack-7.2"),  # from 10.14
    ("HannWindow", 17, "jetpack-7.0"),  # from 10.4
])
def test_ops_the_jetpack_tensorrt_lacks_are_refused(op, opset, since):
    n_in = {"RMSNormalization": 2, "Attention": 3, "HannWindow": 1}[op]
    names = [f"x{i}" for i in range(n_in)]
    m = model([helper.make_node(op, names, ["y"])], [vi(x, TensorProto.FLOAT, [1, 2, 4, 8]) for x in names],
              [vi("y", TensorProto.FLOAT, None)], opset=opset)
    order = ["jetpack-6", "jetpack-7.0", "jetpack-7.2"]
    for target in order:
        found = rules(lint_model(m, target))
        if order.index(target) < order.index(since):
            assert "op" in found, (target, found)
        else:
            assert "op" not in found, (target, found)


def test_opset_24_needs_jetpack_7_2():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [2])],
              [vi("y", TensorProto.FLOAT, [2])], opset=24)
    assert rules(lint_model(m, "jetpack-7.0")) == {"opset"}
    assert rules(lint_model(m, "jetpack-6")) == {"opset"}
    assert lint_model(m, "jetpack-7.2").ok
    m22 = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [2])],
                [vi("y", TensorProto.FLOAT, [2])], opset=22)
    assert lint_model(m22, "jetpack-7.0").ok and not lint_model(m22, "jetpack-6").ok


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_exported_graphs_are_compatible(tiny_bundle_factory, dtype, target):
    _, bundle = tiny_bundle_factory("gqa", dtype=dtype)
    report = check_bundle(bundle, target)
    assert report.ok, report.lines()
    assert report.opset == 17 and report.op_counts["MatMul"] > 0
    if target == "trt-11" and dtype == "fp32":
        assert rules(report, INFO) == {"strong-typing"}
    else:
        assert not report.findings, report.lines()


def test_opset_range_per_target():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [2])],
              [vi("y", TensorProto.FLOAT, [2])], opset=21)
    assert rules(lint_model(m, "trt-10.3")) == {"opset"}
    assert lint_model(m, "trt-10").ok and lint_model(m, "trt-11").ok


def test_dynamic_unsqueeze_axes_fail_before_10_7_only():
    m = model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])],
              [vi("x", TensorProto.FLOAT, [2]), vi("axes", TensorProto.INT64, [1])],
              [vi("y", TensorProto.FLOAT, None)])
    r = lint_model(m, "trt-10.3")
    assert "const-input" in rules(r)
    assert "const-input" not in rules(lint_model(m, "trt-10"))
    # the same op with axes from a Constant node is fine everywhere
    c = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64)))
    ok = model([c, helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [vi("x", TensorProto.FLOAT, [2])],
               [vi("y", TensorProto.FLOAT, None)])
    assert lint_model(ok, "trt-10.3").ok


def test_reduce_axes_must_be_initializers_everywhere():
    m = model([helper.make_node("ReduceSum", ["x", "axes"], ["y"])],
              [vi("x", TensorProto.FLOAT, [2, 3]), vi("axes", TensorProto.INT64, [1])],
              [vi("y", TensorProto.FLOAT, None)], opset=18)
    for target in TARGETS:
        assert "const-input" in rules(lint_model(m, target)), target


def test_unsupported_ops_and_custom_domains():
    m = model([helper.make_node("Unique", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])],
              [vi("y", TensorProto.FLOAT, None)])
    assert rules(lint_model(m, "trt-11")) == {"op"}
    c = model([helper.make_node("FusedThing", ["x"], ["y"], domain="com.example")],
              [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])], domains=["com.example"])
    assert "domain" in rules(lint_model(c, "trt-10"))


def test_llm_ops_arrive_after_10_3():
    m = model([helper.make_node("RMSNormalization", ["x", "s"], ["y"])],
              [vi("x", TensorProto.FLOAT, [2, 4])], [vi("y", TensorProto.FLOAT, [2, 4])], opset=23,
              inits=[numpy_helper.from_array(np.ones(4, np.float32), "s")])
    assert rules(lint_model(m, "trt-10.3")) >= {"op", "opset"}
    assert lint_model(m, "trt-10").ok


def test_element_types():
    dbl = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.DOUBLE, [2])],
                [vi("y", TensorProto.DOUBLE, [2])])
    r = lint_model(dbl, "trt-10.3")
    assert r.ok and "dtype" in rules(r, WARNING)  # cast down with clamping: works, but say so
    s = model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.STRING, [2])],
              [vi("y", TensorProto.STRING, [2])])
    assert "dtype" in rules(lint_model(s, "trt-10"))
    mm = model([helper.make_node("MatMul", ["a", "b"], ["y"])],
               [vi("a", TensorProto.INT32, [2, 2]), vi("b", TensorProto.INT32, [2, 2])],
               [vi("y", TensorProto.INT32, [2, 2])])
    assert rules(lint_model(mm, "trt-10")) == {"op-dtype"}
    cast = model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT16)], [vi("x", TensorProto.FLOAT, [2])],
                 [vi("y", TensorProto.UINT16, [2])])
    assert "op-dtype" in rules(lint_model(cast, "trt-10.3"))


def test_graph_input_reaching_a_shape_operand_is_a_shape_tensor():
    direct = model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [vi("x", TensorProto.FLOAT, [2, 3]), vi("shape", TensorProto.INT64, [2])],
                   [vi("y", TensorProto.FLOAT, None)])
    assert rules(lint_model(direct, "trt-10")) == {"shape-tensor"}
    via_cast = model([helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
                      helper.make_node("Expand", ["x", "n64"], ["y"])],
                     [vi("x", TensorProto.FLOAT, [1, 3]), vi("n", TensorProto.INT32, [2])],
                     [vi("y", TensorProto.FLOAT, None)])
    assert rules(lint_model(via_cast, "trt-11")) == {"shape-tensor"}
    # taking Shape() of an input is how a graph should do it: no finding
    shape_of = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                     [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, None)])
    assert lint_model(shape_of, "trt-10.3").ok


def test_attribute_restrictions():
    m = model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add")],
              [vi("x", TensorProto.FLOAT, [4]), vi("i", TensorProto.INT64, [1, 1]), vi("u", TensorProto.FLOAT, [1])],
              [vi("y", TensorProto.FLOAT, [4])])
    assert rules(lint_model(m, "trt-10")) == {"attribute"}


def test_cli_check_exit_codes(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    ok = subprocess.run([sys.executable, "-m", "qwen2edge.cli", "check", str(bundle), "--target", "trt-10.3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "compatible (0 errors" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.onnx"
    onnx.save(model([helper.make_node("Unique", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])],
                    [vi("y", TensorProto.FLOAT, None)], opset=21), str(bad))
    proc = subprocess.run([sys.executable, "-m", "qwen2edge.cli", "check", str(bad), "--target", "trt-10.3"],
                          capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    assert "NOT compatible (2 errors" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 TensorRT compatibility errors")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_default_model_export_is_compatible(smollm2_bundle, target):
    """The real SmolLM2-135M (Qwen2 layout, 30 layers) export, shared with the validation tests."""
    report = check_bundle(smollm2_bundle, target)
    assert report.ok, report.lines()
    assert report.op_counts["MatMul"] >= 30 * 7


def test_export_reports_findings_through_progress_and_never_fails(tiny_bundle_factory, tmp_path):
    from qwen2edge.exporter.export import report_trt_compat

    _, bundle = tiny_bundle_factory("gqa")
    lines = []
    report_trt_compat(bundle / "model.onnx", "trt-10.3", lines.append)
    assert len(lines) == 1 and "TensorRT check: TensorRT 10.3" in lines[0] and "compatible (0 errors" in lines[0]
    bad = tmp_path / "bad.onnx"
    onnx.save(model([helper.make_node("Unique", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])],
                    [vi("y", TensorProto.FLOAT, None)]), str(bad))
    lines = []
    report_trt_compat(bad, "trt-11", lines.append)
    assert "NOT compatible (1 errors" in lines[0] and "Unique is not supported" in lines[1]
    lines = []
    report_trt_compat(bad, None, lines.append)
    assert lines == []


def test_export_refuses_an_unknown_check_target_before_tracing(tiny_model_factory, tmp_path):
    from qwen2edge.errors import InputError
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    with pytest.raises(InputError, match="unknown --target 'trt-9'"):
        export_bundle(tiny_model_factory("gqa"), tmp_path / "o", ExportOptions(trt_check="trt-9"))
    assert not (tmp_path / "o").exists()
