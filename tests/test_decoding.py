"""Cached decoding's cross-attention: encoder keys/values projected once, read by every step.

Greedy and beam search results themselves are checked against full passes in
test_text2text.py (T5) and test_bart.py (BART, and Hugging Face's generate).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import decoding
from bert_jax.models import bart
from bert_jax.models import t5
from bert_jax.models.bart_config import BartConfig

# d_model (24) differs from every other width and the encoder length (13)
# from every other length, so a dot product reading the encoder output
# [batch, 13, 24] can only be a key/value projection.
ENC_LEN, D_MODEL, DEC_LEN, EOS = 13, 24, 6, 1
# The test-side jits (init, full pass) need no optimised code.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAMILIES = {
    "t5": lambda: t5.T5Model(t5.T5Config.preset(
        "t5_v1_1_tiny", vocab_size=40, d_model=D_MODEL, d_kv=8, num_heads=2, d_ff=32,
        num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)),
    "bart": lambda: bart.BartForConditionalGeneration(BartConfig(
        vocab_size=40, d_model=D_MODEL, num_encoder_layers=1, num_decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=16, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=2)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request):
  """(model, params, encoder tokens [2, 13] with a padded row, decoder inputs [2, 6])."""
  model = FAMILIES[request.param]()
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 40, (2, ENC_LEN)).astype(np.int32)
  enc[1, 8:] = 0
  dec = rng.integers(3, 40, (2, DEC_LEN)).astype(np.int32)
  dec[:, 0] = model.config.decoder_start_token_id
  init = jax.jit(model.init, compiler_options=FAST_COMPILE)
  params = nn.unbox(init(jax.random.key(0), enc, dec)["params"])
  return model, params, jnp.asarray(enc), jnp.asarray(dec)


@functools.partial(jax.jit, static_argnames="model", compiler_options=FAST_COMPILE)
def _full_log_probs(params, enc, dec_in, *, model):
  """Teacher-forced log-probs [batch, dec_len, vocab]."""
  return jax.nn.log_softmax(model.apply({"params": params}, enc, dec_in))


def test_steps_read_the_prefilled_cross_cache(setup):
  model, params, enc, dec = setup
  full = _full_log_probs(params, enc, dec, model=model)  # [2, DEC_LEN, vocab]
  cross = decoding.cross_cache(model, params, enc)
  layer = cross["decoder"]["layers_0"]["encoder_decoder_attention"]
  assert layer["cached_key"].shape == (2, ENC_LEN, 2, 8 if isinstance(model, t5.T5Model)
                                       else D_MODEL // 2)

  @jax.jit
  def step(cache, cross, token):
    # encoded=None: the step has no encoder output to project.
    logits, state = model.apply({"params": params, "cache": cache, "cross_cache": cross},
                                None, enc, token, decode=True, method=type(model).decode,
                                mutable=["cache"])
    return jax.nn.log_softmax(logits[:, 0]), state["cache"]

  cache = decoding._zero_cache(model, 2, ENC_LEN, DEC_LEN)
  zeros = jax.tree.map(jnp.zeros_like, cross)
  for i in range(DEC_LEN):
    logp, next_cache = step(cache, cross, dec[:, i:i + 1])
    np.testing.assert_allclose(logp, full[:, i], atol=1e-5, rtol=0, err_msg=f"step {i}")
    # The cross keys/values are what the step attends to: zeroed, the
    # log-probs change (by far more than the tolerance above; BART's std-0.02
    # random weights keep every change small).
    assert np.abs(step(cache, zeros, dec[:, i:i + 1])[0] - logp).max() > 1e-4
    cache = next_cache
  with pytest.raises(ValueError, match="prefill_cross"):
    model.apply({"params": params, "cache": cache}, None, enc, dec[:, :1], decode=True,
                method=type(model).decode, mutable=["cache"])


LOOP_BODIES = {("while", "body_jaxpr"), ("scan", "jaxpr")}


def _projections_of_encoder_output(jaxpr, in_loop=False):
  """Number of dot products inside loop bodies with a [..., ENC_LEN, D_MODEL] operand."""
  count = 0
  for eqn in jaxpr.eqns:
    if in_loop and eqn.primitive.name == "dot_general":
      count += any(v.aval.shape[-2:] == (ENC_LEN, D_MODEL) for v in eqn.invars)
    for name, param in eqn.params.items():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          body = in_loop or (eqn.primitive.name, name) in LOOP_BODIES
          count += _projections_of_encoder_output(sub, body)
  return count


def test_decode_loop_does_not_project_the_encoder_output(setup):
  model, params, enc, _ = setup
  searches = {
      "greedy": lambda p, e: decoding.greedy_decode(model, p, e, max_decode_length=4, eos_id=EOS),
      "beam": lambda p, e: decoding.beam_search(model, p, e, beam_size=2, max_decode_length=4,
                                                eos_id=EOS)}
  for name, search in searches.items():
    jaxpr = jax.make_jaxpr(search)(params, enc).jaxpr
    assert _projections_of_encoder_output(jaxpr) == 0, name
  # The detector works: a loop of steps given the encoder output projects it
  # (keys and values, in each of the 2 decoder layers).
  encoded = model.apply({"params": params}, enc, method=type(model).encode)
  cache = decoding._zero_cache(model, 2, ENC_LEN, 4)

  def recompute(cache):
    def body(i, cache):
      _, state = model.apply({"params": params, "cache": cache}, encoded, enc,
                             jnp.zeros((2, 1), jnp.int32), decode=True,
                             method=type(model).decode, mutable=["cache"])
      return state["cache"]
    return jax.lax.fori_loop(0, 4, body, cache)

  assert _projections_of_encoder_output(jax.make_jaxpr(recompute)(cache).jaxpr) == 4


def test_beam_search_shares_cross_cache_across_beams(setup):
  """Beams read their example's cross keys/values (repeated k times, never
  reordered): k=3 scores equal teacher-forced log-probs over the length penalty."""
  model, params, enc, _ = setup
  length = 5
  beams, scores = decoding.beam_search(model, params, enc, beam_size=3,
                                       max_decode_length=length, alpha=0.6, eos_id=EOS)
  beams = np.asarray(beams)
  start = model.config.decoder_start_token_id
  for j in range(3):
    dec_in = np.concatenate([np.full((2, 1), start, np.int32), beams[:, j, :-1]], axis=1)
    logp = np.asarray(_full_log_probs(params, enc, dec_in, model=model))
    token_lp = np.take_along_axis(logp, beams[:, j, :, None], axis=-1)[..., 0]
    for b in range(2):
      row = list(beams[b, j])
      n = row.index(EOS) + 1 if EOS in row else length
      np.testing.assert_allclose(scores[b, j], token_lp[b, :n].sum() / ((5 + n) / 6) ** 0.6,
                                 atol=1e-4, err_msg=f"row {b} beam {j}")
