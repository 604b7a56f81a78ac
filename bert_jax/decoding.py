"""Cached decoding of encoder-decoders (T5, BART): greedy search and beam search.

  tokens, log_probs = greedy_decode(model, params, enc_tokens, max_decode_length=64)
  tokens, scores = beam_search(model, params, enc_tokens, beam_size=4, max_decode_length=64,
                               alpha=0.6, min_length=0, no_repeat_ngram=0)

The encoder runs once and so does the projection of its output to every
decoder layer's cross-attention keys/values (`cross_cache`, the model's
`prefill_cross`); then one decoder step per position from the model's
self-attention key/value cache and those cross keys/values, inside one
`lax.while_loop`, jit-compiled per (model, shapes, settings). `model` is
any family model with `encode` / `prefill_cross` / `decode(..., decode=True)`
and `config.decoder_start_token_id` (T5Model, BartForConditionalGeneration).

Beam search follows GNMT / t5x: 2k candidates per step, the best k that did
not end stay alive (the cache gathered by their parent beams), those ending
in EOS join the finished set scored by log-prob / ((5 + length) / 6) ** alpha,
and the search stops at max length or once no alive beam can still beat the
worst finished one. A sequence that reaches max length without EOS is
finished there. Unlike t5x, an ending joins the finished set only when it
ranks among the step's best k candidates (as in fairseq and Hugging Face), so
beam_size=1 with alpha=0 is exactly greedy decoding; t5x would also keep a
runner-up EOS, which can beat the greedy path.

Constraints (both searches; fairseq's and Hugging Face's generation options,
used by BART's CNN/DM recipe: min length 55, no repeated trigram):
  min_length       EOS is not allowed until min_length tokens (EOS not
                   counted) have been generated; max_decode_length still ends
                   a sequence.
  no_repeat_ngram  n > 0: a token that would complete an n-gram already present
                   among the generated tokens (the start token not counted)
                   is not allowed.
A forbidden token's log-prob is NEG_INF before the candidates are ranked; the
returned scores are sums of the log-probs of the tokens kept.
"""
import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
# Large but finite: -inf would give NaN in (-inf) - (-inf) inside the search.
NEG_INF = -1.0e7


def _zero_cache(model, batch: int, encoder_length: int, max_decode_length: int):
  """An empty decoder cache for [batch, max_decode_length], without running init."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((batch, encoder_length), jnp.int32),
                         jnp.ones((batch, max_decode_length), jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def cross_cache(model, params, encoder_input_tokens: Array) -> dict:
  """The encoder output projected to every decoder layer's cross-attention keys/values.

  encoder_input_tokens [batch, enc_len] -> the model's 'cross_cache'
  collection, leaves [batch, enc_len, heads, head_dim]: computed once per
  decode, then read (never recomputed) by every step.
  """
  encoded = model.apply({"params": params}, encoder_input_tokens, method=type(model).encode)
  _, state = model.apply({"params": params}, encoded, method=type(model).prefill_cross,
                         mutable=["cross_cache"])
  return state["cross_cache"]


def _decode_step(model, params, cache, cross, encoder_input_tokens: Array,
                 tokens: Array) -> Tuple[Array, dict]:
  """One cached step: tokens [batch] -> log-probs [batch, vocab] and the new cache.

  No encoder output goes in (encoded=None): the cross-attention reads its
  keys/values from `cross` (read-only, so the loop does not carry it) and
  `encoder_input_tokens` only give its mask.
  """
  logits, state = model.apply(
      {"params": params, "cache": cache, "cross_cache": cross}, None, encoder_input_tokens,
      tokens[:, None], decode=True, method=type(model).decode, mutable=["cache"])
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), state["cache"]


def length_penalty(length, alpha: float):
  """GNMT / t5x brevity penalty ((5 + length) / 6) ** alpha; scores are log-prob / this."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def constrain(logp: Array, seqs: Array, i: Array, *, eos_id: int, min_length: int,
              no_repeat_ngram: int) -> Array:
  """logp [rows, vocab] of the token at column i + 1, with forbidden tokens at NEG_INF.

  Args:
    logp: log-probs of the next token of each row.
    seqs: int32 [rows, L + 1]: column 0 the start token, columns 1..i the
      tokens generated so far (later columns are ignored).
    i: [] the number of tokens generated so far.
    eos_id, min_length, no_repeat_ngram: see the module docstring (static).
  """
  if min_length > 0:
    logp = logp.at[:, eos_id].set(jnp.where(i < min_length, NEG_INF, logp[:, eos_id]))
  n = no_repeat_ngram
  if n > 0:
    rows, width = seqs.shape
    j = jnp.arange(width)
    # An earlier n-gram starts at column j (1 <= j, j + n - 1 <= i): its first
    # n - 1 tokens equal the last n - 1 generated ones -> its last is banned.
    match = (j >= 1) & (j + n - 1 <= i)
    for k in range(n - 1):
      last = jax.lax.dynamic_index_in_dim(seqs, i - n + 2 + k, axis=1, keepdims=True)  # [rows, 1]
      match &= jnp.roll(seqs, -k, axis=1) == last
    banned = jnp.roll(seqs, -(n - 1), axis=1)  # [rows, L + 1]: the token that follows
    mask = jnp.zeros(logp.shape, bool).at[jnp.arange(rows)[:, None], banned].max(match)
    logp = jnp.where(mask, NEG_INF, logp)
  return logp


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id",
                                             "min_length", "no_repeat_ngram"))
def greedy_decode(model, params, encoder_input_tokens: Array, *, max_decode_length: int,
                  eos_id: int = 1, min_length: int = 0, no_repeat_ngram: int = 0
                  ) -> Tuple[Array, Array]:
  """Greedy decoding of a batch from the key/value cache.

  Args:
    model: a T5Model or BartModel (static: hashable, its config frozen).
    params: its parameters.
    encoder_input_tokens: int32 [batch, enc_len], 0-padded.
    max_decode_length: most tokens generated (EOS included).
    eos_id: ends a sequence; later positions are padding (0).
    min_length, no_repeat_ngram: constraints (module docstring); 0 = none.

  Returns:
    (tokens int32 [batch, max_decode_length], log_probs float32 [batch]: the sum
    of the chosen tokens' log-probabilities up to and including EOS).
  """
  batch, enc_len = encoder_input_tokens.shape
  cross = cross_cache(model, params, encoder_input_tokens)
  cache = _zero_cache(model, batch, enc_len, max_decode_length)
  tokens = jnp.zeros((batch, max_decode_length + 1), jnp.int32)
  tokens = tokens.at[:, 0].set(model.config.decoder_start_token_id)

  def cond(state):
    i, _, _, finished, _ = state
    return (i < max_decode_length) & ~jnp.all(finished)

  def body(state):
    i, cache, tokens, finished, log_probs = state
    logp, cache = _decode_step(model, params, cache, cross, encoder_input_tokens,
                               tokens[:, i])  # [batch, vocab]
    logp = constrain(logp, tokens, i, eos_id=eos_id, min_length=min_length,
                     no_repeat_ngram=no_repeat_ngram)
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    best = jnp.where(finished, 0, best)
    chosen = jnp.take_along_axis(logp, best[:, None], axis=-1)[:, 0]
    log_probs = log_probs + jnp.where(finished, 0.0, chosen)
    tokens = tokens.at[:, i + 1].set(best)
    return i + 1, cache, tokens, finished | (best == eos_id), log_probs

  state = (jnp.array(0, jnp.int32), cache, tokens, jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32))
  _, _, tokens, _, log_probs = jax.lax.while_loop(cond, body, state)
  return tokens[:, 1:], log_probs


def _gather_beams(tree, parents: Array, batch: int, beam_size: int):
  """Reorders every [batch * beams, ...] leaf by parent beam ids [batch, beams]; scalars stay."""
  rows = jnp.arange(batch)[:, None]

  def gather(x):
    if x.ndim == 0:
      return x
    x = x.reshape((batch, beam_size) + x.shape[1:])
    return x[rows, parents].reshape((batch * beam_size,) + x.shape[2:])

  return jax.tree.map(gather, tree)


def _take(x: Array, index: Array) -> Array:
  """x [batch, n, ...] at index [batch, m] -> [batch, m, ...]."""
  return x[jnp.arange(x.shape[0])[:, None], index]


@dataclasses.dataclass
class _Beams:
  """Loop state of beam search (a pytree via register_dataclass below)."""
  i: Array               # [] positions decoded so far
  cache: dict            # decoder cache, batch * beam_size rows
  alive_seqs: Array      # [batch, k, L + 1], column 0 the start token
  alive_log_probs: Array  # [batch, k]
  finished_seqs: Array   # [batch, k, L + 1]
  finished_scores: Array  # [batch, k], best first; NEG_INF for empty slots


jax.tree_util.register_dataclass(
    _Beams, data_fields=[f.name for f in dataclasses.fields(_Beams)], meta_fields=[])


def _beam_step(model, params, cross, encoder_tokens, alpha, s: _Beams, *,
               max_decode_length: int, eos_id: int, min_length: int = 0,
               no_repeat_ngram: int = 0) -> _Beams:
  """Extends every alive beam by one token and updates the alive and finished sets."""
  batch, k = s.alive_log_probs.shape
  logp, cache = _decode_step(model, params, s.cache, cross, encoder_tokens,
                             s.alive_seqs[:, :, s.i].reshape(batch * k))
  logp = constrain(logp, s.alive_seqs.reshape(batch * k, -1), s.i, eos_id=eos_id,
                   min_length=min_length, no_repeat_ngram=no_repeat_ngram)
  vocab = logp.shape[-1]
  # [batch, k * vocab]: the log-prob of every one-token extension.
  candidates = (s.alive_log_probs[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, -1)
  # 2k candidates: even if k of them end in EOS, k remain to stay alive.
  top_log_probs, top_index = jax.lax.top_k(candidates, 2 * k)  # [batch, 2k]
  parents, new_tokens = top_index // vocab, (top_index % vocab).astype(jnp.int32)
  top_seqs = _take(s.alive_seqs, parents).at[:, :, s.i + 1].set(new_tokens)  # [batch, 2k, L+1]
  valid = top_log_probs > NEG_INF / 2  # extensions of placeholder beams are not hypotheses
  ended = (new_tokens == eos_id) | (s.i + 1 == max_decode_length)

  alive_log_probs, pick = jax.lax.top_k(jnp.where(ended | ~valid, NEG_INF, top_log_probs), k)
  alive_seqs = _take(top_seqs, pick)
  cache = _gather_beams(cache, _take(parents, pick), batch, k)

  scores = top_log_probs / length_penalty(s.i + 1, alpha)
  # An ending counts only among the step's best k (fairseq, Hugging Face; t5x
  # takes all 2k): then beam_size=1 is exactly greedy decoding.
  in_top_k = jnp.arange(2 * k) < k
  scores = jnp.where(ended & valid & in_top_k, scores, NEG_INF)
  # Old finished first: on equal scores top_k keeps the earlier entry.
  finished_scores, pick = jax.lax.top_k(
      jnp.concatenate([s.finished_scores, scores], axis=1), k)
  finished_seqs = _take(jnp.concatenate([s.finished_seqs, top_seqs], axis=1), pick)
  return _Beams(s.i + 1, cache, alive_seqs, alive_log_probs, finished_seqs, finished_scores)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_decode_length", "eos_id",
                                             "min_length", "no_repeat_ngram"))
def beam_search(model, params, encoder_input_tokens: Array, *, beam_size: int = 4,
                max_decode_length: int, alpha: float = 0.6, eos_id: int = 1,
                min_length: int = 0, no_repeat_ngram: int = 0) -> Tuple[Array, Array]:
  """Beam search of a batch from the key/value cache (see the module docstring).

  The encoder and the cross-attention key/value projection run once, on
  `batch` rows, then are repeated for batch * beam_size rows; the beams of
  an example share them, so only the self-attention cache is reordered.
  With beam_size=1 and alpha=0 this is greedy decoding (with alpha > 0 a
  finished beam may still lose to a longer one).

  Args:
    model: a T5Model or BartModel (static).
    params: its parameters.
    encoder_input_tokens: int32 [batch, enc_len], 0-padded.
    beam_size: k, the number of hypotheses kept (and returned).
    max_decode_length: most tokens generated (EOS included).
    alpha: length penalty exponent >= 0 (t5x default 0.6; 0 ranks by log-prob);
      traced, so changing it does not recompile.
    eos_id: ends a hypothesis.
    min_length, no_repeat_ngram: constraints (module docstring); 0 = none.

  Returns:
    (tokens int32 [batch, k, max_decode_length], 0 after EOS; scores float32
    [batch, k] = sum of token log-probs (EOS included) / length_penalty(number
    of tokens, alpha)), best first.
  """
  batch, enc_len = encoder_input_tokens.shape
  k, length = beam_size, max_decode_length
  alpha = jnp.asarray(alpha, jnp.float32)
  # Row b * k + j is beam j of example b.
  cross = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0),
                       cross_cache(model, params, encoder_input_tokens))
  encoder_tokens = jnp.repeat(encoder_input_tokens, k, axis=0)  # [batch * k, enc_len]
  seqs = jnp.zeros((batch, k, length + 1), jnp.int32)
  seqs = seqs.at[:, :, 0].set(model.config.decoder_start_token_id)
  # Only beam 0 is real at first, so the first step does not pick k copies.
  alive_log_probs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  state = _Beams(jnp.array(0, jnp.int32), _zero_cache(model, batch * k, enc_len, length),
                 seqs, alive_log_probs, seqs, jnp.full((batch, k), NEG_INF, jnp.float32))

  def cond(s: _Beams):
    # Log-probs only fall as a beam grows and the penalty only grows with
    # length, so an alive beam's best possible final score is its log-prob
    # over the largest penalty. Stop when that cannot beat the worst finished.
    best_possible = s.alive_log_probs[:, 0] / length_penalty(length, alpha)
    done = s.finished_scores[:, -1] >= best_possible
    return (s.i < length) & ~jnp.all(done)

  step = functools.partial(_beam_step, model, params, cross, encoder_tokens, alpha,
                           max_decode_length=length, eos_id=eos_id, min_length=min_length,
                           no_repeat_ngram=no_repeat_ngram)
  state = jax.lax.while_loop(cond, step, state)
  return state.finished_seqs[:, :, 1:], state.finished_scores
