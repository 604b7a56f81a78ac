"""T5 v1.1 small / base pretraining: span corruption, inputs 512, targets 114.

Raffel et al. (2020) and the t5x T5.1.1 recipe: C4, span corruption with
noise density 0.15 and mean span length 3 (512 input tokens come from 568 raw
tokens; targets 114), Adafactor (decay rate 0.8, no momentum, factored second
moments, update clipping 1.0, parameter-scale updates), learning rate
"constant * rsqrt_decay" = 1 / sqrt(max(step, 10k)), no dropout during
pretraining, z-loss 1e-4, untied logits with gated GELU (v1.1). Batch 128 x
512 = 2^16 tokens for 2^19 = 524,288 steps: the T5 paper's pretraining budget
(~34B tokens). Vocabulary: the 32,000-piece C4 SentencePiece model + 100
sentinels, model vocabulary 32,128.

Launch (TPU v4-8 for small, v4-32 for base):
  bert-jax train --config=configs/t5.py:small --workdir=gs://BUCKET/t5_small \
    --config.data.source=tfds:c4/en:3.1.0:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
    --config.data.tokenizer=gs://BUCKET/vocab/cc_all.32000/sentencepiece.model
Expected (the T5 paper's baseline, a base-size model with this token budget;
not measured by this project): fine-tuned GLUE average 83.28, SQuAD EM 80.88.
Variants: small (77M parameters), base (248M).
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'small' (default) or 'base'."""
  size = arg or "small"
  if size not in ("small", "base"):
    raise ValueError(f"configs/t5.py: unknown variant {size!r}; choose small or base")
  config = defaults.train_config()
  config.family = "t5"
  config.model = defaults.model_config("t5", f"t5_v1_1_{size}", vocab_size=32128,
                                       dropout_rate=0.0, dtype="bfloat16")

  config.data.source = "tfds:c4/en:3.1.0:text"
  # Set data.data_dir (the prepared tfds folder; gs:// works) and
  # data.tokenizer (the C4 SentencePiece model; '' trains one).
  config.data.vocab_size = 32000
  config.data.objective = "span_corruption"  # noise density 0.15, mean span 3, 100 sentinels
  config.data.seq_length = 512  # inputs; targets follow (114)
  config.data.num_shards = 64

  config.optim = defaults.optim_config("adafactor")  # rsqrt, base 1.0, 10k warmup
  config.train.num_steps = 524_288
  config.train.batch_size = 128
  config.train.z_loss = 1e-4
  config.mesh.fsdp = 1 if size == "small" else 4
  config.mesh.rules = "data_parallel" if size == "small" else "fsdp"

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source  # its validation split
  config.eval.batch_size = 128
  config.eval.num_batches = 20
  return config
