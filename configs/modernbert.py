"""ModernBERT base / large pretraining (Warner et al. 2024), phase 1: MLM at 1024 tokens.

The paper's recipe, as far as this trainer has it: masked LM only (no NSP),
30% of tokens masked (80/10/10), sequence 1024 with RoPE (global theta
160k, local 10k) and alternating global / 128-token sliding-window attention,
GeGLU, pre-norm, no biases; AdamW (the paper's StableAdamW, decoupled decay
1e-5, none on norms and biases), lr 8e-4 (base) / 5e-4 (large) under the
warmup-stable-decay ("trapezoidal") schedule with a 1 - sqrt cool-down over
the last 10% of the steps (the paper cools down after its context extension;
a run extended from a pre-cool-down checkpoint can do the same), every
dropout 0 as in the released configs. Unpadding is done the TPU way:
each document is cut into [CLS] chunk [SEP] examples that are packed into the
1024-token rows with segment ids (data.pack), so attention never crosses
documents, rotary positions restart per example, and only a row's tail is
padding. Not yet here: the batch-size warmup and the later 8192-token
context extension.

Data: any text source; the paper's 2T tokens are its own mixture (web,
code, scientific text). Tokenizer: set data.tokenizer to yours ('' trains a
SentencePiece model on the source); padding id is 0 (the batch contract).

Launch (TPU v4-64, 8 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/modernbert.py:base --workdir=gs://BUCKET/modernbert_base \
    --config.data.source='gs://BUCKET/corpus/*.txt.gz' \
    --config.data.tokenizer=gs://BUCKET/spm/modernbert_50k.model
Expected (the paper's figures with its 2T-token corpus; not measured by this
project): fine-tuned GLUE average 88.4 (base) / 90.4 (large). Watch eval/mlm/loss
and eval/mlm/accuracy in WORKDIR/metrics.jsonl.
Variants: base (149M parameters), large (395M).
"""
import ml_collections

from bert_jax import defaults

# variant: (learning rate, global batch in sequences)
_VARIANTS = {"base": (8e-4, 4608), "large": (5e-4, 4928)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'large'."""
  size = arg or "base"
  if size not in _VARIANTS:
    raise ValueError(f"configs/modernbert.py: unknown variant {size!r}; choose base or large")
  lr, batch = _VARIANTS[size]
  config = defaults.train_config()
  config.family = "modernbert"
  config.model = defaults.model_config("modernbert", size, vocab_size=0)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.vocab_size = 50_000  # only used when training a tokenizer
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm"  # single segments, no NSP
  config.data.pack = True  # per-document examples packed with segment ids (unpadding)
  config.data.mask_rate = 0.3
  config.data.seq_length = 1024
  config.data.max_predictions = 320  # 30% of 1024, rounded up to a multiple of 64
  config.data.num_shards = 256

  config.optim.learning_rate = lr
  config.optim.warmup_steps = 3_000
  config.optim.schedule = "wsd"
  config.optim.decay_steps = 40_000  # the last 10% of train.num_steps
  config.optim.decay_shape = "sqrt"
  config.optim.weight_decay = 1e-5
  config.optim.b2 = 0.98
  config.train.num_steps = 400_000
  config.train.batch_size = batch

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"
  config.eval.batch_size = 512
  return config
