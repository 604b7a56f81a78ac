"""DeBERTa-v3 small / base pretraining (He et al. 2023): RTD with GDES.

The architecture of the paper: disentangled attention (c2p + p2c) over 256
log-bucketed relative positions within +-512, position projections shared
with the content ones, LayerNorm on the relative table, no absolute
positions in the encoder, vocabulary 128100 (SentencePiece), sequence 512.
Pretraining is the paper's: ELECTRA-style replaced-token detection
(objective 'electra': generator MLM + 50 x discriminator RTD) with a DeBERTa
generator of the discriminator's width and half its depth (microsoft/DeBERTa
experiments/language_model/rtd_base.json: 12-layer discriminator, 6-layer
generator; rtd_small.json: 6 and 3), and gradient-disentangled embedding
sharing (embedding_sharing='gdes'): the discriminator's word table is
stop_gradient(generator's) + a delta initialised at zero, so the RTD loss
never moves the generator's embeddings. The generator's MLM head reads the
enhanced mask decoder (absolute positions added before the last layer, as
the reference's masked_language_model.py). Masking: 15%, 80/10/10. AdamW,
lr 1e-4 (base) / 2e-4 (small), 10k warmup steps, 500k steps of 2048
sequences in the paper (v3 base); dropout 0.1.

Fine-tuning and export use the discriminator with its effective table
(generator's + delta): `bert_jax.models.deberta.discriminator(model, params)`
gives a plain DebertaModel and its params, which `bert_jax.save_pretrained`
writes as a Hugging Face DebertaV2Model folder.

Data: any text source. Tokenizer: set data.tokenizer to a SentencePiece
.model with [CLS] [SEP] [MASK] pieces and pad id 0 (the released spm.model
has [PAD]=0 but adds [MASK] outside the model: train your own with
`bert-jax train-tokenizer`), or '' to train one on the source.

Launch (TPU v4-64, 8 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/deberta_v3.py:base --workdir=gs://BUCKET/deberta_v3_base \
    --config.data.source='gs://BUCKET/corpus/*.txt.gz' \
    --config.data.tokenizer=gs://BUCKET/spm/deberta_128k.model
Expected (the paper's figures on its 160GB corpus; not measured by this
project): GLUE dev MNLI-m 90.6 (base), 88.2 (small). Watch eval/mlm/loss
(the generator), eval/rtd/loss and eval/rtd/precision / recall in
WORKDIR/metrics.jsonl.
Variants: base (12 layers, 768 wide, 86M backbone + 98M embedding), small (6 layers, 768 wide).
"""
import ml_collections

from bert_jax import defaults

# variant: (learning rate, global batch in sequences, generator layers: half the discriminator's)
_VARIANTS = {"base": (1e-4, 2048, 6), "small": (2e-4, 2048, 3)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (default) or 'small'."""
  size = arg or "base"
  if size not in _VARIANTS:
    raise ValueError(f"configs/deberta_v3.py: unknown variant {size!r}; choose base or small")
  lr, batch, generator_layers = _VARIANTS[size]
  config = defaults.train_config()
  config.family = "deberta"
  config.model = defaults.model_config("deberta", size, vocab_size=0, enhanced_mask_decoder=True,
                                       embedding_sharing="gdes",
                                       generator_layers=generator_layers)

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.vocab_size = 128_000  # only used when training a tokenizer
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm"  # single segments, no NSP
  config.data.seq_length = 512
  config.data.max_predictions = 80  # 15% of 512, rounded up
  config.data.num_shards = 256
  config.train.objective = "electra"  # generator MLM + 50 x RTD

  config.optim.learning_rate = lr
  config.optim.warmup_steps = 10_000
  config.optim.weight_decay = 0.01
  config.optim.b2 = 0.98
  config.train.num_steps = 500_000
  config.train.batch_size = batch

  config.checkpoint.every_steps = 5_000
  config.log.every_steps = 100
  config.eval.every_steps = 5_000
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"
  config.eval.batch_size = 256
  return config
