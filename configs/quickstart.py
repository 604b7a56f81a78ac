"""Quick start: pretrain a BERT-tiny masked LM on CPU in a few minutes, no download.

The corpus is `builtin:pydoc_topics` (CPython's Language Reference topics,
~65k words, ships with Python); held-out loss is measured on
`builtin:stdlib_docstrings` (the standard library's docstrings: other text, same
domain). With `data.tokenizer` empty, a 4,000-piece SentencePiece vocabulary
with [CLS]/[SEP]/[MASK] is trained on the corpus first and kept in the workdir.

Launch (CPU, 2 idle cores: 2 minutes, 5.4 steps/s):
  bert-jax train --config=configs/quickstart.py --workdir=/tmp/bert_jax_quickstart
Expected: the held-out MLM loss (eval/mlm/loss in WORKDIR/metrics.jsonl) falls
from ~8.3 (about log 4096: uniform over the vocabulary) at step 0 to ~6.7 at
step 400 (measured: 8.38 -> 7.01 at step 100 -> 6.73 at step 400).

Variants (`--config=configs/quickstart.py:VARIANT`): mlm (default), mlm_nsp,
mlm_sop, span_corruption (a T5 v1.1-tiny with Adafactor), albert (a tiny
ALBERT: embedding 64, all layers shared, SOP with n-gram masking), spanbert
(span masking, MLM + span boundary objective, no NSP), electra (a BERT-tiny
discriminator with a 1/4-wide generator, replaced-token detection), distil (a
1-layer student distilled from the default variant's run in /tmp/bert_jax_quickstart),
modernbert (a tiny ModernBERT, packed rows, 30% masking), bart (a tiny BART
denoising autoencoder: text infilling + sentence permutation), deberta (a tiny
DeBERTa-v3: replaced-token detection with a half-depth DeBERTa generator,
gradient-disentangled embedding sharing and the enhanced mask decoder):
  bert-jax train --config=configs/quickstart.py:albert --workdir=/tmp/qs_albert
Expected (albert; measured, 3.4 minutes): eval/mlm/loss 8.38 at step 0 -> 6.76
at step 100 -> 6.67 at step 400, eval/sop/accuracy 0.52 -> 0.62 (256 held-out pairs).
spanbert: SpanBERT's span masking with MLM + the span boundary objective:
  bert-jax train --config=configs/quickstart.py:spanbert --workdir=/tmp/qs_spanbert
Expected (spanbert; measured, 3 minutes): eval/mlm/loss 8.37 at step 0 -> 6.80 at
step 100 -> 6.62 at step 400, eval/sbo/loss 8.38 -> 6.80 -> 6.58.
electra: generator + discriminator (replaced-token detection, loss MLM + 50 x RTD):
  bert-jax train --config=configs/quickstart.py:electra --workdir=/tmp/qs_electra
Expected (electra; measured, 2 minutes): eval/mlm/loss (the generator) 8.35 at step
0 -> 6.86 at step 100 -> 6.46 at step 400; eval/rtd/loss 0.692 -> 0.426 -> 0.417.
distil: a 1-layer student of the default run (after the default command above):
  bert-jax train --config=configs/quickstart.py:distil --workdir=/tmp/qs_distil
Expected (distil; measured, 3 minutes): eval/kd/loss 0.053 at step 0 -> 0.031 at
step 100 -> 0.019 at step 400, eval/mlm/loss 6.81 -> 6.70 -> 6.57 (the 2-layer
teacher's: 6.73), eval/cos/loss 0.081 -> 0.045 -> 0.040.
bart: a 2 + 2-layer BART rebuilding 64-token chunks from Poisson(3) text
infilling of 30% of the words plus sentence permutation (BART's best noise):
  bert-jax train --config=configs/quickstart.py:bart --workdir=/tmp/qs_bart
Expected (bart; measured, 15 minutes with the 2 cores shared by other jobs, 3
steps/s alone): eval/seq2seq/loss 8.36 at step 0 -> 6.55 at step 100 -> 6.22
at step 200 -> 6.17 at step 400 (training loss 4.5: the small corpus is
learnt faster than the other domain), eval/seq2seq/accuracy 0.003 -> 0.13.
deberta: DeBERTa-v3's replaced-token detection (RTD + GDES + EMD, loss MLM + 50 x RTD):
  bert-jax train --config=configs/quickstart.py:deberta --workdir=/tmp/qs_deberta
Expected (deberta; measured, 15 minutes on 2 busy shared cores, so a few on idle ones):
eval/mlm/loss (the generator) 8.37 at step 0 -> 6.96 at step 100 -> 6.76 at step 200
-> 6.57 at step 400; eval/rtd/loss 0.686 -> 0.426 -> 0.420 -> 0.419.
Look at the batches:
  bert-jax inspect --config=configs/quickstart.py --num_batches=2 --out=/tmp/batches.npz
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` picks the objective: mlm (default), mlm_nsp, mlm_sop, span_corruption, albert,
  spanbert, electra, distil, modernbert, bart or deberta."""
  variant = arg or "mlm"
  # albert: ALBERT's own objective (SOP) and masking (n-grams) on its model;
  # spanbert: MLM + span boundary objective on 'mlm' batches with span masking;
  # electra: generator + discriminator on 'mlm' batches; distil: a student
  # distilled from the default variant's run.
  objective = {"albert": "mlm_sop", "spanbert": "mlm", "electra": "mlm",
               "distil": "mlm", "modernbert": "mlm", "bart": "denoising",
               "deberta": "mlm"}.get(variant, variant)
  config = defaults.train_config()

  # data.source builtin:pydoc_topics and data.tokenizer '' (train a
  # SentencePiece model on the source first) are the defaults.
  config.data.objective = objective
  config.data.seq_length = 64  # short rows: a CPU run of minutes
  config.data.max_predictions = 10
  config.data.vocab_size = 4000  # pieces of that trained vocabulary

  if objective == "span_corruption":
    config.family = "t5"
    config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=0, dropout_rate=0.0)
    config.optim = defaults.optim_config("adafactor")
    config.optim.warmup_steps = 100
    config.train.z_loss = 1e-4
  else:
    # vocab_size 0: the tokenizer's 4,000 ids rounded up to 4,096.
    config.model = defaults.model_config("bert", "tiny", vocab_size=0)
    config.optim.learning_rate = 1e-3  # a tiny model on a tiny corpus learns fast
    config.optim.warmup_steps = 40
  if variant == "albert":
    # BERT-tiny's 2 x 128 with 64-wide embeddings and one stored layer.
    config.model.update(model_type="albert", embedding_size=64, share_layers="all",
                        hidden_act="gelu_new")
    config.data.masking = "ngram"
  if variant == "spanbert":
    config.train.objective = "mlm_sbo"
    config.data.masking = "span"  # whole-word spans, Geometric(0.2) clipped at 10 words
  if variant == "electra":
    # BERT-tiny's 2 x 128 discriminator and a 1/4-wide generator (32, one head).
    config.model.update(model_type="electra", generator_size=0.25)
    config.train.objective = "electra"
    config.data.mask_prob, config.data.random_prob = 0.85, 0.0  # ELECTRA's masking
  if variant == "modernbert":
    # A ModernBERT of BERT-tiny's width (2 x 128): rotary, GeGLU, a 32-token sliding window in every
    # layer but the first (global every 2nd); documents packed into the rows
    # with segment ids (its unpadding); 30% masking.
    config.family = "modernbert"
    config.model = defaults.model_config("modernbert", "tiny", vocab_size=0, hidden_size=128,
                                         num_heads=2, intermediate_size=256,
                                         local_attention=32, global_attn_every_n_layers=2)
    config.data.pack = True
    config.data.mask_rate = 0.3
    config.data.max_predictions = 20
  if variant == "bart":
    # A BART of BERT-tiny's width (2 + 2 layers x 128, 2 heads) rebuilding
    # 64-token chunks from BART's best noise: Poisson(3) text infilling of 30%
    # of the words plus sentence permutation (the data defaults). The trained
    # vocabulary's ids: [PAD]=0, [CLS]=2 and [SEP]=3 serve as <pad>, <s>, </s>.
    config.family = "bart"
    config.model = defaults.model_config("bart", "tiny", vocab_size=0, d_model=128,
                                         encoder_attention_heads=2, decoder_attention_heads=2,
                                         encoder_ffn_dim=512, decoder_ffn_dim=512,
                                         max_position_embeddings=64, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=3)
    config.data.mask_rate = 0.3
  if variant == "deberta":
    # DeBERTa-v3 in small: a 2 x 128 discriminator, a 1-layer generator of
    # the same width (half depth), GDES, the EMD on the generator's MLM head,
    # 32 relative buckets; objective generator MLM + 50 x RTD, 80/10/10 masking.
    config.family = "deberta"
    config.model = defaults.model_config("deberta", "tiny", vocab_size=0, hidden_size=128,
                                         num_heads=2, intermediate_size=512,
                                         enhanced_mask_decoder=True, embedding_sharing="gdes")
    config.train.objective = "electra"
  if variant == "distil":
    # A 1-layer DistilBERT-style student of the default (mlm) quick start's
    # 2-layer BERT-tiny: run that first, into its documented workdir.
    config.train.objective = "distillation"
    config.train.teacher = "/tmp/bert_jax_quickstart"
    config.model.update(num_layers=1, model_type="distilbert", type_vocab_size=0)

  config.train.num_steps = 400
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  config.eval.every_steps = 100
  config.eval.source = "builtin:stdlib_docstrings"
  return config
