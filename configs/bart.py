"""BART base / large pretraining (Lewis et al. 2020): a denoising autoencoder.

The paper's recipe (section 3 and 5.1), as this trainer has it:
  * architecture: a standard Transformer encoder-decoder with GELU, learned
    positions (1,024), post-LN plus a LayerNorm on the embeddings; base 6 + 6
    layers of width 768 (12 heads, FFN 3,072), large 12 + 12 layers of width
    1,024 (16 heads, FFN 4,096); GPT-2's byte-level BPE, 50,265 ids, the
    token embedding tied to the output logits (~140M / ~400M parameters);
  * noise: the paper's best combination (section 5.1, table 1), text
    infilling (spans of Poisson(lambda = 3) words, each replaced by ONE
    <mask>, until 30% of the words are covered) plus permutation of all
    sentences; the decoder rebuilds the original chunk (cross-entropy);
  * budget: "following RoBERTa", batch 8,000 sequences for 500k steps on the
    same 160 GB of news, books, stories and web text;
  * optimizer: the paper gives none beyond that; we take RoBERTa's (Liu et al.
    2019, table 9), which BART follows for batch and steps: Adam beta1 0.9,
    beta2 0.98, eps 1e-6, weight decay 0.01, linear warmup then linear decay
    to 0; peak 4e-4 with 30k warmup steps (large), 6e-4 with 24k (base);
    gradient clipping 1.0 (BERT's, this trainer's default); dropout 0.1.
  * rows: 512 tokens (RoBERTa's and fairseq's denoising task's
    tokens_per_sample), <s> chunk </s>, each chunk from one document.
Differences: the paper switches dropout off for the last 10% of the steps
(a resumed run with --config.model.dropout_rate=0.0 from step 450k does
that); the released fairseq recipe used lambda 3.5 (data.poisson_lambda).

Data: any text source; the paper's 160 GB is RoBERTa's corpus. Tokenizer:
set data.tokenizer to a folder with GPT-2 / RoBERTa BPE files (vocab.json +
merges.txt, e.g. those of facebook/bart-base), whose <s>=0, <pad>=1, </s>=2
and <mask> are the model's ids. ('' trains a SentencePiece model on the
source instead: then set model.pad_token_id / bos_token_id / eos_token_id to
its [PAD] / [CLS] / [SEP], as configs/quickstart.py:bart does.)

Launch (TPU v4-64 for base, v4-128 for large: see tpu_scripts/README.md):
  bert-jax train --config=configs/bart.py:base --workdir=gs://BUCKET/bart_base \
    --config.data.source='gs://BUCKET/corpus/*.txt.gz' \
    --config.data.tokenizer=gs://BUCKET/bart_bpe
Fine-tune the result (or facebook/bart-base) with configs/summarization.py.
Expected (the paper's figures for BART-large with its corpus, table 3 and
tables 4-5; not measured by this project): CNN/DailyMail ROUGE-1/2/L 44.16 /
21.28 / 40.90, XSum 45.14 / 22.27 / 37.25, SQuAD 1.1 EM/F1 88.8 / 94.6,
MNLI 89.9. Watch eval/seq2seq/loss in WORKDIR/metrics.jsonl.
Variants: base (140M parameters), large (406M).
"""
import ml_collections

from bert_jax import defaults

# variant: (peak learning rate, warmup steps, data-parallel / fsdp mesh).
_VARIANTS = {"base": (6e-4, 24_000, 1), "large": (4e-4, 30_000, 4)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'large'."""
  size = arg or "base"
  if size not in _VARIANTS:
    raise ValueError(f"configs/bart.py: unknown variant {size!r}; choose base or large")
  lr, warmup, fsdp = _VARIANTS[size]
  config = defaults.train_config()
  config.family = "bart"
  # The preset's sizes, 50,265 ids, 1,024 positions, dropout 0.1, <pad>=1.
  config.model = defaults.model_config("bart", size, dtype="bfloat16")

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.vocab_size = 50_000  # only used when training a tokenizer
  config.data.objective = "denoising"
  config.data.mask_rate = 0.3  # 30% of the words infilled
  config.data.poisson_lambda = 3.0  # span lengths ~ Poisson(3)
  config.data.random_prob = 0.1  # a span -> a random token instead of <mask> (fairseq)
  config.data.permute_sentences = 1.0  # all sentences shuffled
  config.data.delete_ratio = 0.0  # no token deletion
  config.data.rotate_ratio = 0.0  # no document rotation
  config.data.seq_length = 512
  config.data.num_shards = 256

  config.optim.learning_rate = lr
  config.optim.warmup_steps = warmup
  config.optim.b2 = 0.98
  config.optim.weight_decay = 0.01
  config.train.num_steps = 500_000
  config.train.batch_size = 8_000
  config.mesh.fsdp = fsdp
  config.mesh.rules = "data_parallel" if fsdp == 1 else "fsdp"

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"
  config.eval.batch_size = 512
  return config
