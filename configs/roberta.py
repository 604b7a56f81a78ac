"""RoBERTa base pretraining: MLM only, dynamic masking, full-sentence inputs.

Liu et al. (2019): no NSP; inputs are full sentences packed up to 512 tokens,
crossing document boundaries; masks drawn anew every time a sequence is seen
(our pipeline masks on the fly, seeded by epoch, so every epoch has new masks);
batch 8k sequences, 500k steps, Adam lr 6e-4 (beta2 0.98, eps 1e-6), weight
decay 0.01, 24k warmup steps then linear decay to 0, dropout 0.1.
Differences: a SentencePiece vocabulary stands in for GPT-2's byte-level BPE
(set data.tokenizer to your own; '' trains a 50k-piece model on the source), and
padding id is 0 (the batch contract), so positions start at row 1
(position_offset 1, 514 rows as in RoBERTa).

Launch (TPU v4-128, 16 hosts):
  bert-jax train --config=configs/roberta.py --workdir=gs://BUCKET/roberta_base \
    --config.data.source='gs://BUCKET/corpus/*.txt.gz' \
    --config.data.tokenizer=gs://BUCKET/spm/roberta_50k.model
Expected (the paper's figures with its 160 GB corpus; not measured by this
project): fine-tuned GLUE dev MNLI-m 87.6, SST-2 94.8 for RoBERTa-base.
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (the only variant)."""
  if arg not in (None, "base"):
    raise ValueError(f"configs/roberta.py: unknown variant {arg!r}; choose base")
  config = defaults.train_config()
  config.model = defaults.model_config(
      "bert", "base", vocab_size=0, model_type="roberta", type_vocab_size=1,
      max_position_embeddings=514, position_offset=1, layer_norm_eps=1e-5)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.vocab_size = 50_000  # data.tokenizer '' trains a SentencePiece model on the source
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  # data.objective 'mlm' (full sentences, no NSP) with token masking: the defaults.
  config.data.seq_length = 512
  config.data.max_predictions = 80
  config.data.num_shards = 256

  config.optim.learning_rate = 6e-4
  config.optim.warmup_steps = 24_000
  config.optim.b2 = 0.98
  config.train.num_steps = 500_000
  config.train.batch_size = 8192

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"
  config.eval.batch_size = 1024
  return config
