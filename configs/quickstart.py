"""Quick start: a BERT-tiny masked-LM run on text that ships with Python.

The corpus is `builtin:pydoc_topics` (CPython's Language Reference topics, ~65k
words), so nothing is downloaded. With `data.tokenizer` left empty, a small
SentencePiece vocabulary with [CLS]/[SEP]/[MASK] is trained on that corpus
first and cached in the workdir (or, for `inspect` without --workdir, in a
temporary folder).

Look at the batches it makes:
  bert-jax inspect --config=configs/quickstart.py --num_batches=2 --out=/tmp/batches.npz
"""
import ml_collections

from bert_jax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` picks the objective: mlm (default), mlm_nsp, mlm_sop or span_corruption."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32  # global, over all hosts

  config.data = pipeline.default_data_config()
  config.data.source = "builtin:pydoc_topics"
  config.data.objective = arg or "mlm"
  config.data.seq_length = 128
  config.data.max_predictions = 20
  config.data.num_shards = 8
  config.data.tokenizer = ""  # empty: train a SentencePiece model on the source first
  config.data.vocab_size = 4000  # pieces of that trained vocabulary
  return config
