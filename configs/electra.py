"""ELECTRA small / base pretraining (Clark et al. 2020): replaced-token detection.

A generator (a narrow BERT masked LM) fills the masked positions with
tokens sampled from its softmax (Gumbel-max at temperature 1, no gradient
through the sample); the discriminator (the full encoder) predicts, for
every real token, whether it was replaced. A sample equal to the original
counts as original. Both train jointly in one step, on loss = generator MLM
+ 50 x discriminator sigmoid cross entropy (objective 'electra'), and share
the token, position and type embeddings. Fine-tuning starts from the
discriminator ('encoder' in the workdir; layer-wise LR decay is
finetune's optim.decay_rate).

The recipe (the paper's Table 6 and google-research/electra's
configure_pretraining.py):
  small  discriminator 12 layers, hidden 256, 4 heads, FFN 1024, embeddings
         128; generator 1/4 wide (64, 1 head); batch 128 x 128 tokens,
         AdamW lr 5e-4, 1M steps
  base   12 layers, hidden 768, 12 heads, FFN 3072, embeddings 768;
         generator 1/3 wide (256, 4 heads); batch 256 x 512 tokens, lr 2e-4,
         766k steps
  both   15% of tokens masked (max predictions (0.15 + 0.005) x length), of
         them 85% [MASK] and 15% kept (no random tokens), 10k warmup steps
         then linear decay, weight decay 0.01, Adam eps 1e-6, gradient
         clipping 1.0, dropout 0.1, GELU, BERT's uncased WordPiece vocabulary
         (30,522 ids).

Data: any text source; the paper's corpus for small and base is English
Wikipedia + BooksCorpus (Wikipedia here, prepared with tfds, read offline from
data_dir), as single segments of up to the row length (data.objective 'mlm').

Launch (TPU v4-32, 4 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/electra.py:small --workdir=gs://BUCKET/electra_small \
    --config.data.source=tfds:wikipedia/20230601.en:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
    --config.data.tokenizer=gs://BUCKET/vocab/bert-base-uncased/vocab.txt
Expected (the paper's Table 8 dev figures; a pod run is not measured by
this project): ELECTRA-Small GLUE 79.9, ELECTRA-Base 85.1 (after fine-tuning
the discriminator). In WORKDIR/metrics.jsonl watch eval/mlm/loss (the
generator), eval/rtd/loss and eval/rtd/precision and recall on the replaced
tokens; eval/rtd/positive_rate is the fraction of tokens the generator got
wrong (it falls as the generator learns).
"""
import ml_collections

from bert_jax import defaults

# variant: (preset, model overrides, batch, seq length, learning rate, steps)
_VARIANTS = {
    "small": ("small", dict(num_layers=12, hidden_size=256, num_heads=4, intermediate_size=1024,
                            embedding_size=128, generator_size=0.25), 128, 128, 5e-4, 1_000_000),
    "base": ("base", dict(generator_size=1 / 3), 256, 512, 2e-4, 766_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'small' (default) or 'base'."""
  size = arg or "small"
  if size not in _VARIANTS:
    raise ValueError(f"configs/electra.py: unknown variant {size!r}; choose small or base")
  preset, model, batch, length, lr, steps = _VARIANTS[size]
  config = defaults.train_config()
  config.model = defaults.model_config("bert", preset, vocab_size=0, model_type="electra",
                                       **model)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.vocab_size = 30_522  # only used when training a tokenizer
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm"  # single segments, no NSP
  config.data.seq_length = length
  config.data.max_predictions = int((0.15 + 0.005) * length)  # the reference's rule
  config.data.mask_prob = 0.85  # the rest of the chosen tokens stay as they are
  config.data.random_prob = 0.0
  config.data.num_shards = 64
  config.train.objective = "electra"

  # optim: the adamw default (10k warmup, linear decay, wd 0.01, eps 1e-6, clip 1.0).
  config.optim.learning_rate = lr
  config.train.num_steps = steps
  config.train.batch_size = batch

  config.checkpoint.every_steps = 10_000
  config.log.every_steps = 200
  config.eval.every_steps = 10_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"  # wikipedia has only a train split
  config.eval.batch_size = 128
  config.eval.num_batches = 40
  return config
