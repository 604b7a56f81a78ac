"""Model FLOPs of one training example, per family (for MFU).

Pure arithmetic on the config dataclasses (no JAX), so the family registry
and the benchmarks can use it anywhere. Matrix products only, 2 * m * k * n
each; the backward pass is counted as twice the forward.
"""


from bert_jax.models.configs import SBO_POSITION_SIZE, generator_config


def _matmul(m: int, k: int, n: int) -> float:
  """FLOPs of an [m, k] x [k, n] product: one multiply and one add per term."""
  return 2.0 * m * k * n


def bert_train_flops(config, seq_length: int, max_predictions: int | None, *,
                     nsp: bool, sbo: bool = False) -> float:
  """Training FLOPs per example of a BERT-family pre-training model.

  Counts matrix products only, 2 * m * k * n each, as `BertForPreTraining`
  (nsp=True) or `BertForMaskedLM` (nsp=False) computes them. With S =
  seq_length, H = hidden_size, A = num_heads * head_dim (= H), I =
  intermediate_size, L = num_layers, P = max_predictions, V = vocab_size,
  E = embedding_size (ALBERT's factorised embeddings; H when it is 0):

    per layer   2*S*H*3A (q, k, v) + 2*S*A*H (out)
                + 2*S*S*A (scores q.k) + 2*S*S*A (probabilities . v)
                + 2*S*H*I + 2*S*I*H (MLP)
    projection  2*S*E*H (embeddings E -> H), only when embedding_size > 0
    MLM head    2*P*H*E (transform, H -> E) + 2*P*E*V (logits tied to the embedding)
    NSP head    2*H*H (pooler, first token) + 2*H*2, when nsp
    SBO head    2*P*(2H + R)*H (boundaries and position, R = 200 wide)
                + 2*P*H*E + 2*P*E*V, when sbo (SpanBERT)
    forward     L * per layer [+ projection] + MLM head [+ NSP head] [+ SBO head]
    training    3 * forward: the backward pass takes two products per
                forward product (gradients of both operands).

  L counts applied layers: cross-layer sharing (`share_layers`, ALBERT)
  stores fewer parameters but computes every layer all the same.
  The MLM head runs only at the P gathered positions (`mlm_positions`);
  P=None counts it at all S positions (no `mlm_positions`). Embedding
  lookups, norms, softmax and activations are not counted: this is the
  model-FLOPs count of MFU, and recomputation under `remat` is not added.

  Args:
    config: a `bert_jax.models.bert.BertConfig`.
    seq_length: tokens per example (the padded/packed length).
    max_predictions: gathered MLM positions per example, or None.
    nsp: count the pooler and the next-sentence head.
    sbo: count SpanBERT's span boundary head (`BertForMaskedLMWithSbo`).

  Returns:
    FLOPs of one example's forward and backward pass.
  """
  s, h = seq_length, config.hidden_size
  e = config.embedding_size
  p = s if max_predictions is None else max_predictions
  forward = _encoder_forward(config, s) + _mlm_head_forward(config, p)
  if nsp:
    forward += _matmul(1, h, h) + _matmul(1, h, 2)
  if sbo:
    forward += (_matmul(p, 2 * h + SBO_POSITION_SIZE, h) + _matmul(p, h, e or h)
                + _matmul(p, e or h, config.vocab_size))
  return 3.0 * forward


def _encoder_forward(config, s: int) -> float:
  """L layers over S tokens, plus the factorised embeddings' projection (see above)."""
  h, i = config.hidden_size, config.intermediate_size
  a = config.num_heads * config.head_dim
  layer = (_matmul(s, h, 3 * a) + _matmul(s, a, h)  # [S, H] projections
           + 2 * _matmul(s, a, s)  # [S, S] scores, then back to [S, A]
           + _matmul(s, h, i) + _matmul(s, i, h))
  forward = config.num_layers * layer
  if config.embedding_size:
    forward += _matmul(s, config.embedding_size, h)  # [S, E] -> [S, H]
  return forward


def _mlm_head_forward(config, p: int) -> float:
  """The MLM head at P positions: transform H -> E, then logits E -> V."""
  e = config.embedding_size or config.hidden_size
  return _matmul(p, config.hidden_size, e) + _matmul(p, e, config.vocab_size)


def electra_train_flops(config, seq_length: int, max_predictions: int) -> float:
  """Training FLOPs per example of ELECTRA's generator + discriminator (`ElectraForPreTraining`).

  forward = generator encoder over S + its MLM head at P
            + discriminator encoder over S + its head (2*S*H*H + 2*S*H);
  training = 3 * forward, as `bert_train_flops` (the Gumbel sample and the
  token replacement are not matrix products).
  """
  gen = generator_config(config)
  s, h = seq_length, config.hidden_size
  forward = (_encoder_forward(gen, s) + _mlm_head_forward(gen, max_predictions)
             + _encoder_forward(config, s) + _matmul(s, h, h) + _matmul(s, h, 1))
  return 3.0 * forward


def t5_train_flops(config, inputs_length: int, targets_length: int) -> float:
  """Training FLOPs per example of a T5 encoder-decoder (`T5Model`).

  Counts matrix products only, 2 * m * k * n each. With Se = inputs_length,
  Sd = targets_length, D = d_model, A = num_heads * d_kv, F = d_ff,
  G = len(activations) (1 plain, 2 gated), V = vocab_size:

    attention(Sq, Skv)  2*Sq*D*A (q) + 2*Skv*D*2A (k, v) + 2*Sq*A*D (out)
                        + 2*Sq*Skv*A (scores) + 2*Sq*Skv*A (probabilities . v)
    mlp(S)              2*S*D*G*F (wi, or wi_0 and wi_1) + 2*S*F*D (wo)
    encoder layer       attention(Se, Se) + mlp(Se)
    decoder layer       attention(Sd, Sd) + attention(Sd, Se) + mlp(Sd)
    logits              2*Sd*D*V (tied or untied alike)
    training            3 * (num_encoder_layers * encoder layer
                             + num_decoder_layers * decoder layer + logits)

  Causal self-attention is counted over the full Sd x Sd square, as it is
  computed (masked, not skipped). Embedding lookups, relative position
  biases, norms, softmax and activations are not counted.

  Args:
    config: a `bert_jax.models.t5.T5Config`.
    inputs_length: encoder tokens per example.
    targets_length: decoder tokens per example.

  Returns:
    FLOPs of one example's forward and backward pass.
  """
  d, f, g = config.d_model, config.d_ff, len(config.activations)
  a = config.num_heads * config.d_kv
  se, sd = inputs_length, targets_length

  def attention(sq, skv):
    return (_matmul(sq, d, a) + _matmul(skv, d, 2 * a) + _matmul(sq, a, d)
            + 2 * _matmul(sq, a, skv))

  def mlp(s):
    return _matmul(s, d, g * f) + _matmul(s, f, d)

  forward = (config.num_encoder_layers * (attention(se, se) + mlp(se))
             + config.num_decoder_layers * (attention(sd, sd) + attention(sd, se) + mlp(sd))
             + _matmul(sd, d, config.vocab_size))
  return 3.0 * forward


def modernbert_train_flops(config, seq_length: int, max_predictions: int | None) -> float:
  """Training FLOPs per example of a ModernBERT masked LM (`ModernBertForMaskedLM`).

  As `bert_train_flops` with a GeGLU MLP (2*S*H*2I in, 2*S*I*H out) and the
  attention square counted in full in every layer (sliding-window layers
  compute the masked S x S scores too). The MLM head: 2*P*H*H + 2*P*H*V;
  P=None counts it at all S positions. training = 3 * forward.
  """
  s, h, i = seq_length, config.hidden_size, config.intermediate_size
  p = s if max_predictions is None else max_predictions
  layer = (_matmul(s, h, 3 * h) + _matmul(s, h, h) + 2 * _matmul(s, h, s)
           + _matmul(s, h, 2 * i) + _matmul(s, i, h))
  forward = config.num_layers * layer + _matmul(p, h, h) + _matmul(p, h, config.vocab_size)
  return 3.0 * forward


def _deberta_layer_forward(config, s: int) -> float:
  """One DeBERTa layer over S tokens: BERT's plus, per disentangled term (c2p, p2c;
  R = 2 x attention_span relative rows), 2*R*H*H to project the relative table and
  2*S*R*H for the content x position scores over the whole table."""
  h, i = config.hidden_size, config.intermediate_size
  terms = len(config.pos_att_type) if config.relative_attention else 0
  r = 2 * config.attention_span
  return (_matmul(s, h, 3 * h) + _matmul(s, h, h) + 2 * _matmul(s, h, s)
          + _matmul(s, h, i) + _matmul(s, i, h)
          + terms * (_matmul(r, h, h) + _matmul(s, h, r)))


def _deberta_mlm_forward(config, s: int, p: int) -> float:
  """A DeBERTa masked LM's forward: its layers, DeBERTa-v2's ConvLayer (a k-wide
  grouped convolution, 2*k*H*H/groups per token), the EMD's two extra passes of the
  last layer (config.enhanced_mask_decoder) and the MLM head at P positions."""
  h = config.hidden_size
  passes = config.num_layers + (2 if config.enhanced_mask_decoder else 0)
  conv = s * _matmul(config.conv_kernel_size, h // config.conv_groups, h)
  return (passes * _deberta_layer_forward(config, s) + conv + _matmul(p, h, h)
          + _matmul(p, h, config.vocab_size))


def deberta_train_flops(config, seq_length: int, max_predictions: int | None) -> float:
  """Training FLOPs per example of a DeBERTa-v2/v3 masked LM (`DebertaForMaskedLM`).

  As `bert_train_flops` (nsp=False) plus, per layer and per disentangled
  term (c2p, p2c; R = 2 x attention_span relative rows): 2*R*H*H to project
  the relative table (shared projections are still applied to it) and
  2*S*R*H for the content x position scores over the whole table (the
  gather then picks S x S of them). With the enhanced mask decoder the last
  layer runs twice more over the whole sequence. training = 3 * forward.
  """
  s = seq_length
  p = s if max_predictions is None else max_predictions
  return 3.0 * _deberta_mlm_forward(config, s, p)


def deberta_electra_train_flops(config, seq_length: int, max_predictions: int) -> float:
  """Training FLOPs per example of DeBERTa-v3's replaced-token detection
  (`DebertaForReplacedTokenDetection`, task 'electra').

  forward = the generator (config.generator(): its layers, the EMD if any,
            its MLM head at P) + the discriminator's num_layers layers over S
            (it never runs the EMD) + its RTD head (2*S*H*H + 2*S*H);
  training = 3 * forward, as `electra_train_flops` (GDES's table sum, the
  sample and the replacement are not matrix products).
  """
  s, h = seq_length, config.hidden_size
  forward = (_deberta_mlm_forward(config.generator(), s, max_predictions)
             + config.num_layers * _deberta_layer_forward(config, s)
             + _matmul(s, h, h) + _matmul(s, h, 1))
  return 3.0 * forward


def bart_train_flops(config, inputs_length: int, targets_length: int) -> float:
  """Training FLOPs per example of a BART encoder-decoder (`BartForConditionalGeneration`).

  As `t5_train_flops` with A = D (heads x head width = d_model), a plain MLP
  (G = 1) of width encoder_ffn_dim / decoder_ffn_dim per stack and tied
  logits 2*Sd*D*V. Biases, embeddings, positions, norms, softmax and
  activations are not counted; causal self-attention counts the full
  square. training = 3 * forward.
  """
  d, se, sd = config.d_model, inputs_length, targets_length

  def attention(sq, skv):
    return _matmul(sq, d, d) + _matmul(skv, d, 2 * d) + _matmul(sq, d, d) + 2 * _matmul(sq, d, skv)

  def mlp(s, f):
    return _matmul(s, d, f) + _matmul(s, f, d)

  forward = (config.num_encoder_layers * (attention(se, se) + mlp(se, config.encoder_ffn_dim))
             + config.num_decoder_layers * (attention(sd, sd) + attention(sd, se)
                                            + mlp(sd, config.decoder_ffn_dim))
             + _matmul(sd, d, config.vocab_size))
  return 3.0 * forward
