"""SpanBERT base / large pretraining (Joshi et al. 2020): span masking, MLM + SBO, no NSP.

The BERT encoder with SpanBERT's two changes: masking contiguous spans of
whole words (lengths from Geometric(0.2) clipped at 10 words, mean 3.8; 15%
of the tokens; one 80/10/10 outcome per span) and the span boundary
objective (SBO): each masked token is also predicted from the hidden states
of the two tokens just outside its span plus an embedding of its place in
the span (a 2-layer GeLU + LayerNorm MLP, then the tied output embeddings),
loss = MLM + SBO. No NSP: each row is one contiguous segment of up to 512
tokens from one document (data.objective 'mlm').

The recipe (the paper's section 4.1 and the released launch command in
facebookresearch/SpanBERT pretraining/README.md): batch 256 sequences of 512
tokens, 2.4M steps, AdamW lr 1e-4 (beta1 0.9, beta2 0.999, eps 1e-8),
weight decay 0.01, 10k warmup steps then linear decay, gradient clipping 1.0,
dropout 0.1, GeLU; SBO weight 1.0 with 15 position rows of width 200
(--max-pair-targets 15, --pair-positional-embedding-size 200). The released
models use BERT's cased WordPiece vocabulary (28,996 ids).

Data: any text source; the paper's corpus is English Wikipedia + BooksCorpus
(Wikipedia here, prepared with tfds, read offline from data_dir).

Launch (TPU v4-32, 4 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/spanbert.py:base --workdir=gs://BUCKET/spanbert_base \
    --config.data.source=tfds:wikipedia/20230601.en:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
    --config.data.tokenizer=gs://BUCKET/vocab/bert-base-cased/vocab.txt
Expected (the paper's Table 1/2 figures; a pod run is not measured by this
project): SpanBERT-large fine-tunes to SQuAD 1.1 dev F1 94.6 / EM 88.8 and
SQuAD 2.0 F1 88.7; SpanBERT-base to SQuAD 1.1 F1 92.4. Held-out mlm/loss and
sbo/loss in WORKDIR/metrics.jsonl are the curves to watch (sbo above mlm:
it sees only the boundaries).
Variants: base (110M parameters), large (340M; same recipe).
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'large'."""
  size = arg or "base"
  if size not in ("base", "large"):
    raise ValueError(f"configs/spanbert.py: unknown variant {size!r}; choose base or large")
  config = defaults.train_config()
  config.model = defaults.model_config("bert", size, vocab_size=0)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  # Set data.data_dir (the prepared tfds folder) and data.tokenizer (the BERT
  # cased vocab.txt; '' trains a SentencePiece model on the source).
  config.data.vocab_size = 28_996  # only used when training a tokenizer
  config.data.lower_case = False  # the released SpanBERT models are cased
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm"  # single full segments, no NSP
  config.data.masking = "span"
  config.data.seq_length = 512
  config.data.max_predictions = 80  # >= 15% of 512 (77)
  config.data.num_shards = 64
  config.train.objective = "mlm_sbo"

  # optim: the adamw default (lr 1e-4, 10k warmup, linear decay, wd 0.01, clip 1.0).
  config.optim.eps = 1e-8  # the reference's --adam-eps (BERT's default is 1e-6)
  config.train.num_steps = 2_400_000
  config.train.batch_size = 256

  config.checkpoint.every_steps = 10_000
  config.log.every_steps = 200
  config.eval.every_steps = 10_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"  # wikipedia has only a train split
  config.eval.batch_size = 256
  config.eval.num_batches = 40
  return config
