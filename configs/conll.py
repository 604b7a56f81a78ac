"""CoNLL-2003 NER fine-tuning (entity F1, conlleval), from a Hugging Face BERT folder.

Labels on the first sub-word of each word (data.label_all_subwords=True labels
all); lr 5e-5, batch 32, 3 epochs, 10% warmup, max length 128.

Launch:
  bert-jax finetune --config=configs/conll.py --workdir=/tmp/conll \
    --config.init_from=HF_FOLDER --config.data.data_dir=../shared/data/conll2003
  bert-jax predict --config=configs/conll.py --workdir=/tmp/conll ...  # test.txt.conll
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """No variants (`arg` must be empty)."""
  if arg:
    raise ValueError(f"configs/conll.py has no variant {arg!r}")
  config = defaults.finetune_config()
  config.task = "conll"
  config.data.data_dir = "../shared/data/conll2003"
  config.data.train_split = "train.txt"
  config.data.eval_splits = "valid.txt"
  config.data.predict_split = "test.txt"
  config.optim.learning_rate = 5e-5
  # Length 128, batch 32, 3 epochs, 10% warmup: the fine-tuning defaults.
  return config
