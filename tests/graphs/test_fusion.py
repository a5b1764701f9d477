"""The exported graph runs projections that share an input as one MatMul (q/k/v, gate/up) and builds
no shape arithmetic per layer, in every dtype; its values stay those of transformers
(tests/exporter/test_parity.py) and ONNX Runtime still optimizes it as before."""

import collections

import numpy as np
import onnx
import pytest
import torch

from qwen2edge.config import load_hf_config
from qwen2edge.graphs.model import reshape_keep, signed_sin
from qwen2edge.runtime.bundle import Bundle


def _layer_ops(model, layer: int) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node
                               if f"/layers.{layer}/" in n.name and n.op_type != "Constant")


def _weight_matmuls(model) -> list[tuple[int, ...]]:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@pytest.mark.parametrize("variant,dtype", [("gqa", "fp32"), ("mha_odd", "fp32"), ("gqa", "fp16")])
def test_one_matmul_per_shared_input_and_no_shape_ops_in_layers(variant, dtype, tiny_bundle_factory):
    model_dir, bundle_dir = tiny_bundle_factory(variant, dtype)
    cfg, _ = load_hf_config(model_dir)
    model = onnx.load(str(bundle_dir / "model.onnx"))
    c, d = cfg.hidden_size, cfg.head_dim
    qkv = (c, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d)
    per_layer = [qkv, (cfg.num_attention_heads * d, c), (c, 2 * cfg.intermediate_size), (cfg.intermediate_size, c)]
    want = per_layer * cfg.num_hidden_layers + [(c, cfg.vocab_size)]
    assert sorted(_weight_matmuls(model)) == sorted(want)
    for layer in range(cfg.num_hidden_layers):
        ops = _layer_ops(model, layer)
        # q/k/v split, q|k split after one shared rotary, rotate-half split, gate/up split
        assert ops["Split"] == 4, ops
        assert not {"Shape", "Gather", "Neg"} & set(ops), ops  # static reshapes, no rotate_half Neg
        assert ops["Unsqueeze"] <= 2, ops  # only the cache length, as the two Slice bounds of the probabilities


def test_onnx_runtime_graph_per_layer_is_small(tiny_bundle_factory, tmp_path):
    """After ONNX Runtime's optimizer a layer is ~37 nodes (was ~78 before the fusion)."""
    model_dir, bundle_dir = tiny_bundle_factory("gqa")
    cfg, _ = load_hf_config(model_dir)
    Bundle.open(bundle_dir).backend("ort", optimized_model_path=tmp_path / "opt.onnx")
    opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    for layer in range(cfg.num_hidden_layers):
        n = sum(_layer_ops(opt, layer).values())
        assert 0 < n <= 40, (layer, _layer_ops(opt, layer))


def test_reshape_keep_and_signed_sin_are_exact():
    x = torch.randn(2, 3, 12)
    assert torch.equal(reshape_keep(x, 2, 3, 4), x.reshape(2, 3, 3, 4))
    assert torch.equal(reshape_keep(x, 1, 4, -1, 3), x.reshape(2, 4, -1, 3))
    sin = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    xs = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    rotate_half = np.concatenate([-xs[:, 4:], xs[:, :4]], axis=-1)
    swapped = np.concatenate([xs[:, 4:], xs[:, :4]], axis=-1)
    assert np.array_equal(rotate_half * sin, swapped * signed_sin(sin))  # bit for bit: only signs move
