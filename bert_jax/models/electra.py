"""ELECTRA pre-training (Clark et al. 2020): a generator and a discriminator in one model.

`ReplacedTokenDetection` is the run, for any encoder family (each gives its
generator, discriminator and heads by subclassing: `ElectraForPreTraining`
here for BERT, `deberta.DebertaForReplacedTokenDetection` for DeBERTa-v3,
which shares embeddings by GDES). `ElectraForPreTraining` (the BERT family's
'electra' task) runs, in one
apply and so in one jitted step:

  1. the generator, a narrow BERT encoder (`configs.generator_config`:
     generator_size x hidden, same depth) with an MLM head, over the masked
     input, scored at the masked positions (`mlm_positions`);
  2. a sample from its softmax at each masked position (Gumbel-max at
     `temperature`, under stop_gradient: no gradient reaches the generator
     through the sample);
  3. the discriminator, the full encoder, over the input with the samples
     put back at the masked positions (the other positions keep their
     original tokens), and a per-token head saying which tokens were
     replaced. A sample equal to the original token counts as original.

The two encoders share the token, position and type embeddings and their
LayerNorm (the reference's tied generator embeddings): the discriminator
owns them under 'encoder/embeddings' and the generator reads them; each keeps
its own projection to its hidden size when the tables are narrower. The
generator's MLM output is tied to the same word table.

Parameters: 'encoder' (the discriminator, carried over to fine-tuning as
any BERT encoder), 'rtd' (its head), 'generator' (the generator's layers and
embedding projection) and 'generator_mlm' (its MLM head). Outputs:
{'mlm_logits' [batch, max_predictions, vocab] (the generator's),
 'rtd_logits' [batch, length], 'rtd_labels' int32 [batch, length]}.

Randomness: the sample draws from the 'sample' rng stream when the caller
gives one (the train step does, per step and microbatch); without one (eval)
a fixed key, so evaluation is deterministic.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import bert
from bert_jax.models.configs import BertConfig, generator_config

Array = jax.Array


def gumbel_sample(logits: Array, key: Array, temperature: float = 1.0) -> Array:
  """A token drawn from softmax(logits / temperature) per row, by Gumbel-max; no gradient.

  logits [..., vocab] -> int32 [...]. argmax(l / T + g) with g ~ Gumbel(0, 1)
  is distributed as softmax(l / T); the logits pass stop_gradient first, so
  the sample is a constant of the generator's parameters.
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
  noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def replace_tokens(tokens: Array, positions: Array, weights: Array, targets: Array,
                   sampled: Array) -> tuple[Array, Array]:
  """The discriminator's input and labels from the generator's samples.

  Args:
    tokens: int [batch, length], the masked input (originals elsewhere).
    positions, weights, targets: [batch, n], the gathered MLM slots (weight
      0 marks a padding slot, which changes nothing).
    sampled: int [batch, n], the generator's samples.

  Returns:
    (corrupted int32 [batch, length], labels int32 [batch, length]): the
    input with samples at the scored slots, and 1 where a sample differs
    from the original token (a sample equal to it is 'original').
  """
  length = tokens.shape[1]
  rows = jnp.arange(tokens.shape[0])[:, None]  # [batch, 1]
  # Padding slots point past the end and are dropped by the scatter.
  cols = jnp.where(weights > 0, positions, length).astype(jnp.int32)
  corrupted = jnp.asarray(tokens, jnp.int32).at[rows, cols].set(sampled, mode="drop")
  replaced = (sampled != targets).astype(jnp.int32)
  labels = jnp.zeros(tokens.shape, jnp.int32).at[rows, cols].set(replaced, mode="drop")
  return corrupted, labels


class ReplacedTokenDetection(nn.Module):
  """Generator + discriminator, trained jointly (objective 'electra'), of any encoder family.

  A family subclasses it with `parts()`, which (called inside the compact
  __call__) makes its modules and returns two functions:
    generate(tokens, mlm_positions, **inputs) -> MLM logits [batch, n, vocab]
    discriminate(tokens, **inputs) -> RTD logits [batch, length]
  where **inputs are the batch's type / segment / position ids, mask and
  enable_dropout. Embedding sharing lives in the family's parts: BERT ties
  (ElectraForPreTraining below), DeBERTa ties or disentangles the gradients
  (GDES, deberta.DebertaForReplacedTokenDetection).

  Attributes:
    config: the discriminator's config; the family derives the generator's.
    temperature: the sampling temperature (1.0 in the paper).
  """
  config: Any
  temperature: float = 1.0

  def parts(self) -> tuple[Callable[..., Array], Callable[..., Array]]:
    raise NotImplementedError(f"{type(self).__name__} must define parts()")

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_type_ids=None, encoder_segment_ids=None,
               encoder_positions=None, encoder_mask=None, mlm_positions=None,
               mlm_targets=None, mlm_weights=None, enable_dropout=False) -> dict[str, Array]:
    tokens = encoder_input_tokens
    if mlm_positions is None or mlm_targets is None or mlm_weights is None:
      if not self.is_initializing():
        raise ValueError("ELECTRA needs mlm_positions, mlm_targets and mlm_weights in the "
                         "batch (the gathered MLM form every masking emits)")
      # Parameters are traced from the tokens alone (Family.init_features).
      mlm_positions = jnp.zeros((tokens.shape[0], 1), jnp.int32)
      mlm_targets, mlm_weights = mlm_positions, jnp.zeros(mlm_positions.shape, jnp.float32)
    inputs = dict(encoder_type_ids=encoder_type_ids, encoder_segment_ids=encoder_segment_ids,
                  encoder_positions=encoder_positions, encoder_mask=encoder_mask,
                  enable_dropout=enable_dropout)
    generate, discriminate = self.parts()

    # 1. The generator over the masked input; its MLM logits at the masked slots.
    mlm_logits = generate(tokens, mlm_positions, **inputs)  # [batch, n, vocab]

    # 2. Samples at the masked slots, and the corrupted input.
    key = self.make_rng("sample") if self.has_rng("sample") else jax.random.PRNGKey(0)
    sampled = gumbel_sample(mlm_logits, key, self.temperature)  # [batch, n]
    corrupted, labels = replace_tokens(tokens, mlm_positions, mlm_weights, mlm_targets, sampled)

    # 3. The discriminator: which tokens were replaced.
    rtd_logits = discriminate(corrupted, **inputs)  # [batch, length]
    return {"mlm_logits": mlm_logits, "rtd_logits": rtd_logits, "rtd_labels": labels}


class ElectraForPreTraining(ReplacedTokenDetection):
  """BERT-family ELECTRA: generator_config(config) wide, tied embeddings (module docstring)."""
  config: BertConfig

  def parts(self):
    cfg = self.config
    gen_cfg = generator_config(cfg)
    encoder = bert.BertEncoder(cfg, add_pooler=False, name="encoder")
    generator = bert.BertEncoder(gen_cfg, add_pooler=False, name="generator")

    def generate(tokens, mlm_positions, **inputs):
      hidden = generator(tokens, embeddings_from=encoder, **inputs)[0]  # [batch, length, gen]
      gathered = jnp.take_along_axis(hidden, mlm_positions[:, :, None].astype(jnp.int32),
                                     axis=1)  # [batch, n, gen]
      return bert.MlmHead(gen_cfg, name="generator_mlm")(gathered, encoder)

    def discriminate(tokens, **inputs):
      return bert.RtdHead(cfg, name="rtd")(encoder(tokens, **inputs)[0])

    return generate, discriminate
