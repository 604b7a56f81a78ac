"""CoNLL-2003 NER fine-tuning (entity F1, conlleval), from a Hugging Face BERT folder.

Labels on the first sub-word of each word (data.label_all_subwords=True labels
all); lr 5e-5, batch 32, 3 epochs, 10% warmup, max length 128.

The variant picks the NER head (`finetune.ner_head`; the same as
--config.finetune.ner_head=crf on the default file):
  (none)  softmax: per-token labels, a word's tag is the argmax at its first sub-word
  crf     a linear-chain CRF over the words, BIO-constrained, Viterbi decoding
  span    every span of up to finetune.max_span_length (8) words classified,
          greedily decoded into flat entities
All three are scored by the same entity F1 on word tags.

Launch:
  bert-jax finetune --config=configs/conll.py --workdir=/tmp/conll \
    --config.init_from=HF_FOLDER --config.data.data_dir=../shared/data/conll2003
  bert-jax finetune --config=configs/conll.py:crf --workdir=/tmp/conll_crf ...(same fields)
  bert-jax predict --config=configs/conll.py --workdir=/tmp/conll ...  # test.txt.conll
"""
import ml_collections

from bert_jax import defaults

HEADS = ("softmax", "crf", "span")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the NER head, one of HEADS (default softmax)."""
  head = arg or "softmax"
  if head not in HEADS:
    raise ValueError(f"configs/conll.py has no variant {arg!r}; choose one of {list(HEADS)}")
  config = defaults.finetune_config()
  config.task = "conll"
  config.finetune.ner_head = head
  config.data.data_dir = "../shared/data/conll2003"
  config.data.train_split = "train.txt"
  config.data.eval_splits = "valid.txt"
  config.data.predict_split = "test.txt"
  config.optim.learning_rate = 5e-5
  # Length 128, batch 32, 3 epochs, 10% warmup: the fine-tuning defaults.
  return config
