"""GLUE fine-tuning: any of the nine tasks, from a Hugging Face BERT folder.

The variant names the task: cola, sst2, mrpc, stsb (regression), qqp, mnli
(dev_matched + dev_mismatched), qnli, rte, wnli. Hyperparameters are BERT's
GLUE recipe (lr 2e-5, batch 32, 3 epochs, 10% warmup, linear decay, max length
128); the run keeps the best epoch by the task's metric (accuracy, F1 for
MRPC/QQP, Matthews for CoLA, Pearson for STS-B).

Launch (GLUE_DIR holds SST-2/ or sst2/, ... as distributed):
  bert-jax finetune --config=configs/glue.py:sst2 --workdir=/tmp/sst2 \
    --config.init_from=HF_FOLDER --config.data.data_dir=GLUE_DIR
  bert-jax evaluate --config=configs/glue.py:sst2 --workdir=/tmp/sst2 ...(same fields)
  bert-jax predict --config=configs/glue.py:sst2 --workdir=/tmp/sst2 ...  # SST-2.tsv
The shared data has SST-2 and MRPC: --config.data.data_dir=../shared/data.
"""
import ml_collections

from bert_jax import finetune
from bert_jax.tasks import glue


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is the GLUE task name (default sst2)."""
  name = (arg or "sst2").lower()
  task = glue.get_task(name)  # an unknown name fails here, naming the known ones
  config = finetune.default_config()
  config.task = "glue"
  config.glue_task = task.name
  config.data.data_dir = "../shared/data"
  config.data.max_length = 128
  if task.name == "mnli":
    config.data.eval_splits = "dev_matched,dev_mismatched"
    config.data.predict_split = "test_matched"
  else:
    config.data.eval_splits = "dev"
    config.data.predict_split = "test"
  config.data.padding = "bucket"
  config.data.pad_multiple = 32

  config.optim.learning_rate = 2e-5
  config.optim.weight_decay = 0.01
  config.train.num_epochs = 3
  config.train.batch_size = 32
  config.train.warmup_fraction = 0.1
  config.eval.batch_size = 64
  return config
