"""SQuAD v1.1 fine-tuning (official EM/F1), from a Hugging Face BERT folder.

run_squad's recipe: windows of 384 tokens, doc stride 128, questions cut to 64
tokens, n-best 20, answers up to 30 tokens; lr 3e-5, batch 32, 2 epochs, 10%
warmup. Variant v2 reads SQuAD v2.0 files (null answers).

Launch (SQUAD_DIR holds train-v1.1.json and dev-v1.1.json, plain or .gz):
  bert-jax finetune --config=configs/squad.py --workdir=/tmp/squad \
    --config.init_from=HF_FOLDER --config.data.data_dir=SQUAD_DIR
  bert-jax predict --config=configs/squad.py --workdir=/tmp/squad ...  # {id: answer} JSON
The shared data has only the dev set (../shared/data/squad/dev-v1.1.json.gz).
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'v1' (default) or 'v2'."""
  version = arg or "v1"
  if version not in ("v1", "v2"):
    raise ValueError(f"configs/squad.py: unknown variant {arg!r}; choose v1 or v2")
  suffix = "v1.1" if version == "v1" else "v2.0"
  config = defaults.finetune_config()
  config.task = "squad"
  config.data.data_dir = "../shared/data/squad"
  config.data.train_split = f"train-{suffix}.json"
  config.data.eval_splits = f"dev-{suffix}.json"
  config.data.predict_split = f"dev-{suffix}.json"
  config.data.max_length = 384
  config.data.padding = "max"  # windows are nearly all full length
  # doc stride 128, questions of 64, n-best 20, answers of 30: the defaults.

  config.optim.learning_rate = 3e-5
  config.train.num_epochs = 2
  return config
