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

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is the GLUE task name (default sst2)."""
  name = defaults.glue_task_name(arg or "sst2")  # an unknown name fails, naming the known ones
  config = defaults.finetune_config()
  config.task = "glue"
  config.glue_task = name
  config.data.data_dir = "../shared/data"
  if name == "mnli":
    config.data.eval_splits = "dev_matched,dev_mismatched"
    config.data.predict_split = "test_matched"
  # The rest is BERT's GLUE recipe, the fine-tuning defaults: max length 128,
  # bucketed padding, lr 2e-5 with 10% warmup and weight decay 0.01, batch 32,
  # 3 epochs.
  return config
