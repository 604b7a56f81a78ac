"""BERT base / large pretraining, the original recipe: MLM + NSP, sequence 128.

Devlin et al. (2019): batch 256, 1M steps, Adam lr 1e-4 (beta2 0.999, eps
1e-6), weight decay 0.01 (none on LayerNorm and biases), 10k warmup steps then
linear decay to 0, dropout 0.1, GELU, 15% masking (80/10/10) with at most 20
predictions per 128-token sequence, NSP with 50% random next segments. The
original spends 90% of the steps at 128 tokens and the last 10% at 512; this
file is the 128-token phase run for all the steps (set --config.data.seq_length
=512 --config.data.max_predictions=80 for a 512-token run).

Data: any text source; the reference corpus is English Wikipedia (+ BooksCorpus)
prepared with tfds, read offline from data_dir. Tokenizer: the BERT uncased
WordPiece vocab.txt (30,522 ids; the model's vocabulary is padded to 30,592).

Launch (TPU v4-32, 4 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/bert.py:base --workdir=gs://BUCKET/bert_base \
    --config.data.source=tfds:wikipedia/20230601.en:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
    --config.data.tokenizer=gs://BUCKET/vocab/bert-base-uncased/vocab.txt
Expected (the paper's figures; a pod run is not measured by this project): the
checkpoint fine-tunes to SQuAD v1.1 dev EM/F1 80.8/88.5 (base) and 84.1/90.9
(large) with the 512-token phase; held-out mlm/loss and nsp/accuracy in
WORKDIR/metrics.jsonl are the curves to watch.
Variants: base (110M parameters), large (340M; lr 1e-4, batch 256, same recipe).
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'large'."""
  size = arg or "base"
  if size not in ("base", "large"):
    raise ValueError(f"configs/bert.py: unknown variant {size!r}; choose base or large")
  config = defaults.train_config()
  config.model = defaults.model_config("bert", size, vocab_size=0, hidden_act="gelu_tanh")

  config.data.source = "tfds:wikipedia/20230601.en:text"
  # Set data.data_dir (the prepared tfds folder; gs:// works) and
  # data.tokenizer (the BERT uncased vocab.txt; '' trains SentencePiece).
  config.data.vocab_size = 30522  # only used when training a tokenizer
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm_nsp"
  config.data.num_shards = 64
  # seq_length 128 with 20 predictions, token masking, uncased: the defaults.

  # optim: the adamw default (lr 1e-4, 10k warmup, linear decay, wd 0.01), 1M steps.
  config.train.batch_size = 256

  config.checkpoint.every_steps = 10_000
  config.log.every_steps = 200
  config.eval.every_steps = 10_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"  # wikipedia has only a train split
  config.eval.batch_size = 256
  config.eval.num_batches = 40
  return config
