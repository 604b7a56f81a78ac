"""DistilBERT (Sanh et al. 2019): a 6-layer student distilled from a BERT-base teacher.

The student (BERT-base width, half the depth, no token types: Hugging
Face's DistilBert*) starts from the teacher's embeddings, MLM head and
layers 0, 2, 4, 7, 9, 11. Each step runs the frozen teacher (no dropout, no
optimizer state, sharded like the student) on the same masked batch and
trains the student on 5 x T^2 KL(teacher || student) at T = 2 over the
masked positions + 2 x its own MLM loss + 1 x the cosine loss between the two
final hidden states (objective 'distillation'; metrics kd/*, mlm/*, cos/*).
No NSP: single segments, dynamic masking (15%, 80/10/10).

The recipe (the paper's section 3 and Hugging Face's distillation example,
which the released distilbert-base-uncased follows): batches of 4K
sequences, Adam lr 5e-4, eps 1e-6, no weight decay, 5% warmup then linear
decay, gradient clipping 5.0, dropout 0.1, 3 epochs of English Wikipedia +
BooksCorpus (about 3.3B words: ~2,000 steps of 4,096 x 512 tokens per epoch,
so 6,000 steps; set train.num_steps from your corpus).

Teacher: a Hugging Face BertForMaskedLM / BertForPreTraining folder (e.g.
bert-base-uncased, whose vocab.txt the run then uses) or a bert-jax train
workdir, given as --config.train.teacher. The student's fields must equal
the teacher's but for num_layers, model_type and type_vocab_size (an error
names any other).

Launch (TPU v4-32, 4 hosts: see tpu_scripts/README.md for the VM side):
  bert-jax train --config=configs/distilbert.py --workdir=gs://BUCKET/distilbert \
    --config.train.teacher=gs://BUCKET/hf/bert-base-uncased \
    --config.data.source=tfds:wikipedia/20230601.en:text \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Expected (the paper's Table 1; a pod run is not measured by this project):
the student fine-tunes to GLUE 77.0 (BERT-base 79.5), SQuAD 1.1 dev
EM/F1 77.7/85.8, with 40% fewer parameters and 60% faster inference. Export
the student with bert_jax.save_pretrained(bert.build(student_config, 'mlm'),
{'encoder': params['encoder'], 'mlm': params['mlm']}, DIR): a
DistilBertForMaskedLM folder.
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'base' (the only variant; the default)."""
  if arg not in (None, "base"):
    raise ValueError(f"configs/distilbert.py: unknown variant {arg!r}; choose base")
  config = defaults.train_config()
  config.model = defaults.model_config("bert", "base", vocab_size=0, num_layers=6,
                                       model_type="distilbert", type_vocab_size=0)
  config.train.objective = "distillation"
  config.train.teacher = ""  # required: --config.train.teacher=HF_FOLDER_OR_WORKDIR

  config.data.source = "tfds:wikipedia/20230601.en:text"
  config.data.split = "train[:99%]"  # the last 1% is held out for eval
  config.data.objective = "mlm"  # single segments, no NSP
  config.data.seq_length = 512
  config.data.max_predictions = 77  # 15% of 512
  config.data.num_shards = 64

  config.train.num_steps = 6_000
  config.train.batch_size = 4096
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 300  # 5% of the steps
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 5.0

  config.checkpoint.every_steps = 500
  config.log.every_steps = 20
  config.eval.every_steps = 500
  config.eval.source = config.data.source
  config.eval.split = "train[99%:]"  # wikipedia has only a train split
  config.eval.batch_size = 256
  config.eval.num_batches = 20
  return config
