"""bench/step_profile.py: op paths, matmul FLOPs read from HLO, and a one-layer profile."""
import re

import jax
import jax.numpy as jnp
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("step_profile")


def test_paths_fold_layers_and_tell_backward_from_forward(bench):
  fwd = "jit(wrapped)/jvp(BertForMaskedLM)/BertForMaskedLM._encode/encoder/layer_3/mlp/wi/dot_general"
  bwd = ("jit(wrapped)/transpose(jvp(T5Model))/T5Model.encode/encoder/layers_6/mlp/add_any")
  assert bench.path_of(fwd) == "fwd BertForMaskedLM/encoder/layer_L/mlp/wi/dot_general"
  assert bench.path_of(bwd) == "bwd T5Model/encoder/layer_L/mlp/add_any"
  assert bench.path_of("") == "fwd (unnamed)"


def test_matmul_flops_are_read_from_the_compiled_hlo(bench):
  def f(x, w, v):
    return jnp.tanh(x @ w) @ v  # [6, 5] x [5, 7], then [6, 7] x [7, 3]

  args = (jnp.ones((6, 5)), jnp.ones((5, 7)), jnp.ones((7, 3)))
  ops = bench.hlo_ops(jax.jit(f).lower(*args).compile().as_text())
  flops = sorted(flops for _, flops in ops.values() if flops)
  # Both dots are found, whether top-level or inside a fusion's body.
  assert sorted(set(flops)) == [2 * 6 * 7 * 3, 2 * 6 * 5 * 7]


# A library fusion as XLA:CPU prints it (names shortened): the dot sits in the
# body the fusion calls, not on the fusion's own line.
_FUSED_HLO = """\
%fused_computation.7 (param_0.1: f32[64,16], param_1.2: f32[16,8]) -> f32[64,8] {
  %param_0.1 = f32[64,16]{1,0} parameter(0)
  %param_1.2 = f32[16,8]{1,0} parameter(1)
  ROOT %dot.3 = f32[64,8]{1,0} dot(%param_0.1, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (x: f32[64,16], w: f32[16,8]) -> f32[64,8] {
  %x = f32[64,16]{1,0} parameter(0)
  %w = f32[16,8]{1,0} parameter(1)
  ROOT %ynn_fusion.7 = f32[64,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.7, metadata={op_name="jit(f)/layer_2/mlp/wi/dot_general"}
}
"""


def test_a_dot_inside_a_library_fusion_is_rated(bench):
  ops = bench.hlo_ops(_FUSED_HLO)
  assert ops["ynn_fusion.7"] == ("jit(f)/layer_2/mlp/wi/dot_general", 2 * 64 * 8 * 16)
  assert ops["x"][1] == 0  # a parameter is no matmul


@pytest.mark.slow
def test_one_layer_profile_names_the_model_paths(bench, capsys):
  bench.main(["--shape=minilm", "--layers=1", "--steps=1", "--top=8"])
  out = capsys.readouterr().out
  assert "s/step unprofiled" in out
  ops_s, dot_s = map(float, re.search(r"ops ([\d.]+) s \(matmuls ([\d.]+) s", out).groups())
  # The step's matmuls are found and rated (about 70% of the op time on CPU);
  # missing the ones inside library fusions would leave a few percent.
  assert dot_s > 0.3 * ops_s
  assert "layer_L/" in out  # ops traced back to the encoder layer they belong to
  assert "bwd " in out and "fwd " in out
  components = dict((m.group(2), float(m.group(1))) for m in
                    re.finditer(r"^\s+([\d.]+)\s+[\d.]+%\s+(.+)$",
                                out.split("by component")[1], re.M))
  # The dense layers are found, and the components add up to all op time.
  assert components["FFN matmuls"] > 0 and components["attention projections"] > 0
  assert sum(components.values()) == pytest.approx(ops_s, rel=0.01)


@pytest.mark.parametrize("path, component", [
    ("fwd BertForMaskedLM/encoder/layer_L/attention/query/dot_general", "attention projections"),
    ("bwd T5Model/encoder/layer_L/attention/out/dot_general", "attention projections"),
    ("fwd T5Model/decoder/layer_L/encoder_decoder_attention/key/dot_general",
     "attention projections"),
    ("bwd T5Model/decoder/layer_L/self_attention/bqhd,bkhd->bhqk/dot_general",
     "attention core"),
    ("bwd T5Model/encoder/layer_L/mlp/wi_0/dot_general", "FFN matmuls"),
    ("bwd T5Model/decoder/layer_L/mlp/dot_general", "FFN matmuls"),  # stacked wi_0, wi_1
    ("fwd BertForMaskedLM/encoder/layer_L/attention/bqhd,bkhd->bhqk/dot_general",
     "attention core"),
    ("bwd T5Model/encoder/relpos_bias/transpose", "attention core"),
    ("fwd T5Model/encoder/layer_L/mlp/Dropout_0/add", "dropout"),
    ("bwd T5Model/encoder/layer_L/mlp/add_any", "FFN elementwise"),
    ("fwd BertForMaskedLM/encoder/layer_L/attention_norm/mul", "norms"),
    ("fwd BertForMaskedLM/mlm/encoder.attend/embeddings.attend/...e,ve->...v/dot_general",
     "vocabulary head"),
    ("fwd T5Model/logits_dense/dot_general", "vocabulary head"),
    ("fwd /exp", "loss"),
    ("fwd add", "optimizer and unnamed"),
    ("bwd T5Model/decoder/shared/broadcast_in_dim", "embeddings"),
    ("fwd BertForMaskedLM/pooler/dense/dot_general", "other"),
])
def test_paths_fall_into_model_components(bench, path, component):
  assert bench.component_of(path) == component
