"""T5 text-to-text fine-tuning: any GLUE task, CoNLL-2003 NER or SQuAD as text.

The variant names the task: a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli,
qnli, rte, wnli), conll, squad (v1.1) or squad_v2. Inputs and targets are the
T5 paper's casting (appendix D; bert_jax/tasks/text2text.py): 'sst2
sentence: ...' -> 'positive', 'question: Q context: C' -> the answer, NER as
'EU = ORG ; German = MISC'. Hyperparameters are the T5 paper's fine-tuning
recipe (section 3.1.3): Adafactor at a constant learning rate of 1e-3, no
warmup, dropout 0.1 (the checkpoint's own rate), greedy decoding; T5 trained
2^18 steps at batch 128, here 3 epochs of batch 32 (a few thousand steps on
one GLUE task). The run keeps the best epoch by the task's metric, scored on
decoded texts (an unparseable output counts as wrong).

Launch (T5_FOLDER: a Hugging Face T5 folder with spiece.model, e.g. t5-small
or google/t5-v1_1-base; or a `bert-jax train --config=configs/t5.py` workdir):
  bert-jax finetune --config=configs/text2text.py:sst2 --workdir=/tmp/t5_sst2 \
    --config.init_from=T5_FOLDER --config.data.data_dir=GLUE_DIR
  bert-jax evaluate --config=configs/text2text.py:sst2 --workdir=/tmp/t5_sst2 ...
  bert-jax predict --config=configs/text2text.py:sst2 --workdir=/tmp/t5_sst2 ...  # SST-2.tsv
  --config.decode.beam_size=4 decodes with beam search (length penalty alpha 0.6).
Expected (published, not measured here: the T5 paper, table 14, T5-Small
fine-tuned per task): SST-2 dev accuracy ~91-92, SQuAD v1.1 EM 79.1 / F1 87.2.
"""
import importlib.util
import os

import ml_collections

from bert_jax import defaults


def _task_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The BERT config file's task fields (data folder, splits) to start from."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bert_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a GLUE task name (default sst2), 'conll', 'squad' or 'squad_v2'."""
  name = (arg or "sst2").lower()
  if name == "conll":
    config = _task_config("conll", None)
    config.data.max_target_length = 128  # every entity of a sentence, spelled out
  elif name in ("squad", "squad_v2"):
    config = _task_config("squad", "v2" if name == "squad_v2" else "v1")
    config.data.max_length = 512  # the whole context: no windows in text-to-text
    config.data.max_target_length = 32
    config.data.padding = "bucket"
  else:
    try:
      defaults.glue_task_name(name)
    except ValueError as e:
      raise ValueError(f"configs/text2text.py: variant {name!r}: {e}; or conll, squad, "
                       "squad_v2") from None
    config = _task_config("glue", name)
    config.data.max_length = 256  # the task prefix and field names add a few tokens
    config.data.max_target_length = 8  # one label word or an STS-B score
  config.family = "t5"
  config.finetune.head = "text2text"  # also with family='bart', which has a GLUE head
  config.data.tokenizer = ""  # init_from's spiece.model
  config.data.pad_multiple = 32

  config.optim = defaults.optim_config("adafactor")
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.train.warmup_fraction = 0.0
  config.train.num_epochs = 3
  config.train.batch_size = 32
  config.eval.batch_size = 64
  config.decode.beam_size = 1
  return config
