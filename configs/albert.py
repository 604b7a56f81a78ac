"""ALBERT base / large pretraining (Lan et al. 2020): MLM + sentence-order prediction.

The BERT encoder with ALBERT's two options: factorised embeddings (E=128,
projected up to the hidden size) and cross-layer sharing (one layer's
parameters applied in all 12 / 24 layers). The recipe: batch 4096, LAMB lr
0.00176 with 3125 warmup steps then linear decay, 125k steps, sequence 512
with at most 20 predictions (the released recipe's max_predictions_per_seq),
n-gram masking with n <= 3 (P(n) proportional to 1/n), SOP (label 1 = the two
segments swapped), no dropout (the v2 models; the paper's section 4.9), GELU (tanh form: Hugging Face's gelu_new), a
30k SentencePiece vocabulary. Sizes: base H768 (12M parameters), large H1024
(18M); 64-dim heads, FFN 4H.

Data: any text source; the paper's corpus is English Wikipedia + BooksCorpus
(Wikipedia here, prepared with tfds, read offline from data_dir).
Tokenizer: data.tokenizer '' trains a 30,000-piece SentencePiece model on the
source (or point it at ALBERT's spiece.model).

Launch (TPU v4-64, 8 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/albert.py:base --workdir=gs://BUCKET/albert_base \
    --config.data.source=tfds:wikipedia/20230601.en:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
    --config.data.tokenizer=gs://BUCKET/spm/albert_30k.model
Expected (the paper's Table 2 figures; a pod run is not measured by this
project): ALBERT-base fine-tunes to SQuAD v1.1 dev F1/EM 89.3/82.3, MNLI 81.6,
SST-2 90.3; large to 90.6/83.9, 83.5, 91.7. Held-out mlm/loss and
sop/accuracy in WORKDIR/metrics.jsonl are the curves to watch.
Variants: base (12M parameters), large (18M; same recipe).
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'large'."""
  size = arg or "base"
  if size not in ("base", "large"):
    raise ValueError(f"configs/albert.py: unknown variant {size!r}; choose base or large")
  config = defaults.train_config()
  config.model = defaults.model_config(
      "bert", size, vocab_size=0, model_type="albert", embedding_size=128,
      share_layers="all", hidden_act="gelu_new", dropout_rate=0.0,
      attention_dropout_rate=0.0)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.vocab_size = 30_000  # data.tokenizer '' trains a SentencePiece model on the source
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm_sop"
  config.data.masking = "ngram"  # n <= 3, P(n) ~ 1/n
  config.data.seq_length = 512
  config.data.max_predictions = 20
  config.data.num_shards = 128

  config.optim = defaults.optim_config("lamb")  # lr 0.00176, 3125 warmup, linear decay
  config.train.num_steps = 125_000
  config.train.batch_size = 4096

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"  # wikipedia has only a train split
  config.eval.batch_size = 512
  config.eval.num_batches = 40
  return config
