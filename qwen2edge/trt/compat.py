"""`qwen2edge check`: lint an ONNX graph against a TensorRT target's parser rules, without TensorRT.

Checks: opset range and op domains, operators and their element types, inputs that must be
initializers/constants (e.g. Slice/Reduce axes; Squeeze/Unsqueeze axes before 10.7), attribute
restrictions, element types TensorRT lacks (float64 is cast down), graph inputs that would become
shape tensors, and (TensorRT 11) what strong typing means for the precision. Needs `onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BuildError, InputError
from .support_matrix import CAST_DOWN, DEFAULT_TARGET, KNOWN_TYPES, SHAPE_INPUTS, TARGETS, Target

ERROR, WARNING, INFO = "error", "warning", "info"
# Ops that pass a value through unchanged enough to carry a graph input into a shape operand.
_SHAPE_CARRIERS = {"Cast", "Identity", "Squeeze", "Unsqueeze", "Concat", "Reshape", "Flatten"}


@dataclass(frozen=True)
class Finding:
    severity: str
    rule: str
    message: str
    node: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "rule": self.rule, "message": self.message, "node": self.node}


@dataclass
class CompatReport:
    target: str
    label: str
    opset: int
    op_counts: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        n = {s: sum(f.severity == s for f in self.findings) for s in (ERROR, WARNING, INFO)}
        verdict = "compatible" if self.ok else "NOT compatible"
        return (f"{self.label}: {verdict} ({n[ERROR]} errors, {n[WARNING]} warnings, {n[INFO]} notes; opset "
                f"{self.opset}, {sum(self.op_counts.values())} nodes, {len(self.op_counts)} op types)")

    def lines(self) -> list[str]:
        return [f"{f.severity:<7} {f.rule:<16} {f.message}" + (f" [{f.node}]" if f.node else "")
                for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "label": self.label, "ok": self.ok, "opset": self.opset,
                "op_counts": self.op_counts, "findings": [f.to_dict() for f in self.findings]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise InputError(f"unknown --target {name!r}: pass one of {', '.join(TARGETS)}")
    return TARGETS[name]


def _elem_name(elem: int) -> str:
    import onnx

    try:
        name = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem != onnx.TensorProto.BFLOAT16 else "bfloat16"
    except (KeyError, TypeError, ValueError):
        name = onnx.TensorProto.DataType.Name(elem).lower()
    return {"float8_e4m3fn": "float8e4m3fn", "object": "string"}.get(name, name)


def _node_label(node: Any) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def lint_model(model: Any, target: str = DEFAULT_TARGET) -> CompatReport:
    """Lint an onnx.ModelProto (weights need not be loaded) for `target`."""
    import onnx

    tgt = get_target(target)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best-effort here; types then come from what is declared
        pass
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report = CompatReport(tgt.name, tgt.label, opset, dict(sorted(counts.items())))
    add = report.findings.append

    if not tgt.opset_min <= opset <= tgt.opset_max:
        add(Finding(ERROR, "opset", f"opset {opset} is outside {tgt.label}'s {tgt.opset_min}..{tgt.opset_max}: "
                                    f"re-export with --opset {min(max(opset, tgt.opset_min), tgt.opset_max)}"))
    custom = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
    if custom:
        add(Finding(ERROR, "domain", f"custom op domains {custom} need TensorRT plugins"))

    types: dict[str, str] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = _elem_name(vi.type.tensor_type.elem_type)
    constants = {t.name for t in g.initializer}
    for t in g.initializer:
        types[t.name] = _elem_name(t.data_type)
    for n in g.node:
        if n.op_type == "Constant":
            constants.update(n.output)
    graph_inputs = {i.name for i in g.input} - constants

    _check_types(report, types, graph_inputs, {o.name for o in g.output})
    for n in g.node:
        _check_node(report, tgt, n, types, constants)
    _check_shape_tensors(report, g, graph_inputs)
    if tgt.strongly_typed_only:
        floats = {types.get(t.name) for t in g.initializer} & {"float32", "float16", "bfloat16"}
        if floats == {"float32"}:
            add(Finding(INFO, "strong-typing", f"{tgt.label} builds strongly typed networks only: this fp32 graph "
                                               "runs in fp32; export with --dtype fp16 or bf16 for reduced precision"))
    return report


def _check_types(report: CompatReport, types: dict[str, str], inputs: set[str], outputs: set[str]) -> None:
    seen: set[str] = set()
    for name, t in types.items():
        if t in CAST_DOWN and t not in seen:
            seen.add(t)
            report.findings.append(Finding(WARNING, "dtype", f"{t} tensors (e.g. {name}) are cast down to float32 "
                                                             "with clamping by the parser"))
        elif t not in KNOWN_TYPES and t not in CAST_DOWN and t not in seen:
            seen.add(t)
            report.findings.append(Finding(ERROR, "dtype", f"element type {t} (e.g. {name}) is not a TensorRT type"))
        elif t == "uint8" and name not in inputs | outputs and "uint8" not in seen:
            seen.add(t)
            report.findings.append(Finding(ERROR, "dtype", f"uint8 is only allowed for network inputs/outputs, "
                                                           f"not the internal tensor {name}"))
    if "bfloat16" in types.values():
        report.findings.append(Finding(INFO, "dtype", "bf16 tensors need a GPU with compute capability 8.0+ "
                                                      "(Ampere: Jetson Orin yes, Xavier no)"))


_ATTR_RULES: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "ScatterND": lambda a: "reduction must be 'none'" if a.get("reduction", b"none") not in (b"none", "none") else None,
    "Resize": lambda a: "antialias is not supported" if a.get("antialias", 0) else None,
    "AveragePool": lambda a: "dilations must be all ones" if any(d != 1 for d in a.get("dilations", [])) else None,
    "MaxPool": lambda a: "dilations must be all ones" if any(d != 1 for d in a.get("dilations", [])) else None,
    "LSTM": lambda a: "layout must be 0" if a.get("layout", 0) else None,
    "TopK": lambda a: "sorted must be 1" if a.get("sorted", 1) != 1 else None,
    "Constant": lambda a: ("sparse_value / string values are unsupported"
                           if {"sparse_value", "value_string", "value_strings"} & set(a) else None),
}


def _check_node(report: CompatReport, tgt: Target, n: Any, types: dict[str, str], constants: set[str]) -> None:
    import onnx

    add, label = report.findings.append, _node_label(n)
    if n.domain not in ("", "ai.onnx"):
        return  # reported once as a domain error
    if n.op_type not in tgt.ops:
        add(Finding(ERROR, "op", f"{n.op_type} is not supported by {tgt.label}'s ONNX parser", label))
        return
    data_in = next((i for i in n.input if i), None)
    t = types.get(data_in) if data_in else None
    if n.op_type == "Cast":
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        t_out = _elem_name(to) if to is not None else None
        if t_out and t_out not in tgt.ops["Cast"] and t_out not in CAST_DOWN:
            add(Finding(ERROR, "op-dtype", f"Cast to {t_out} is not supported by {tgt.label}", label))
    if t and t not in tgt.ops[n.op_type] and t not in CAST_DOWN and n.op_type not in ("Shape", "Size"):
        add(Finding(ERROR, "op-dtype", f"{n.op_type} on {t} is not supported by {tgt.label} "
                                       f"(supports {', '.join(sorted(tgt.ops[n.op_type]))})", label))
    for op, idx, what in tgt.const_inputs:
        if n.op_type == op and len(n.input) > idx and n.input[idx] and n.input[idx] not in constants:
            add(Finding(ERROR, "const-input", f"{op} input `{what}` must be an initializer or Constant for "
                                              f"{tgt.label}", label))
    rule = _ATTR_RULES.get(n.op_type)
    if rule:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        problem = rule(attrs)
        if problem:
            add(Finding(ERROR, "attribute", f"{n.op_type}: {problem} for {tgt.label}", label))


def _check_shape_tensors(report: CompatReport, g: Any, graph_inputs: set[str]) -> None:
    """A graph input whose *values* (not its shape) reach a shape operand becomes a shape tensor."""
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for name in sorted(graph_inputs):
        frontier, seen = [name], {name}
        while frontier:
            cur = frontier.pop()
            for n in consumers.get(cur, []):
                slots = SHAPE_INPUTS.get(n.op_type, ())
                if any(idx < len(n.input) and n.input[idx] == cur for idx in slots):
                    report.findings.append(Finding(
                        ERROR, "shape-tensor", f"graph input {name} feeds the shape operand of {n.op_type}, making it "
                                               "a shape tensor that needs set_shape_input values in every profile; "
                                               "compute it inside the graph from Shape() instead", _node_label(n)))
                    frontier = []
                    break
                if n.op_type in _SHAPE_CARRIERS:
                    for o in n.output:
                        if o not in seen:
                            seen.add(o)
                            frontier.append(o)


def lint_path(onnx_path: str | Path, target: str = DEFAULT_TARGET) -> CompatReport:
    """Lint a model file (external weights are not loaded: the rules need only the graph)."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: pass an export directory (with model.onnx) or an .onnx file")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        # The rules read types, shapes and small constants only: drop large inline weights so shape
        # inference does not copy them (the same state external-data weights are already in).
        if len(t.raw_data) > 4096:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value="stripped-by-qwen2edge-check")
    return lint_model(model, target)


def check_bundle(path: str | Path, target: str = DEFAULT_TARGET) -> CompatReport:
    """`qwen2edge check OUT_DIR|MODEL.onnx --target ...`."""
    path = Path(path)
    if path.is_dir():
        from ..bundle_manifest import BundleManifest

        path = path / BundleManifest.read(path, verify=False).model_file
    return lint_path(path, target)


def require_compatible(report: CompatReport) -> None:
    if not report.ok:
        first = report.errors[0]
        raise BuildError(f"{len(report.errors)} TensorRT compatibility errors for {report.label} (first: "
                         f"{first.message}): fix the graph or pick another --target")

