"""PET cloze few-shot fine-tuning (Schick & Schuetze 2021) of GLUE classification tasks.

The variant names the task: sst2, cola, mrpc, qqp, qnli, rte, mnli. Each
example becomes a fill-in-the-blank text (`cloze.pattern`) whose [MASK] the
pretrained MLM head fills with a label word (`cloze.verbalizer`); training
is cross entropy over the verbalizer words' scores at the mask (PET's
restricted softmax), prediction their argmax (bert_jax/tasks/cloze.py).
`init_from` must have an MLM head: a Hugging Face *ForMaskedLM /
*ForPreTraining folder or a `bert-jax train` workdir. Patterns and words are
LM-BFF's (Gao et al. 2021) manual prompts.

Few-shot: `cloze.k_per_class` examples of each label (16 by default; 0 =
all) drawn from the training split with `cloze.sample_seed` (-1: `seed`).
`cloze.head='cls'` trains the ordinary [CLS] classifier on the same subset,
the baseline (bench/pet_fewshot.py runs both over k and seeds).

Pattern placeholders: {text_a}, {text_b} (pair tasks), {mask} (once), and
optionally {sep} (segment break: [CLS] A [SEP] B [SEP]). The verbalizer is
'label=word,...' over the GLUE label names, '|' between several words of one
label. `cloze.single_token`: every word must be one vocabulary token.

Launch (an MLM checkpoint; GLUE_DIR holds SST-2/ or sst2/, ...):
  bert-jax finetune --config=configs/pet.py:sst2 --workdir=/tmp/pet_sst2 \
    --config.init_from=MLM_FOLDER_OR_WORKDIR --config.data.data_dir=GLUE_DIR
  # the [CLS] baseline on the same 16 examples per class:
  bert-jax finetune --config=configs/pet.py:sst2 --workdir=/tmp/cls_sst2 \
    --config.cloze.head=cls --config.init_from=... --config.data.data_dir=GLUE_DIR
The shared data has SST-2 and MRPC: --config.data.data_dir=../shared/data.
"""
import ml_collections

from bert_jax import defaults

# task -> (pattern, verbalizer).
PROMPTS = {
    "sst2": ("{text_a} It was {mask}.", "0=terrible,1=great"),
    "cola": ("{text_a} This is {mask}.", "0=incorrect,1=correct"),
    "mrpc": ("{text_a} {mask}, {text_b}", "0=no,1=yes"),
    "qqp": ("{text_a} {mask}, {text_b}", "0=no,1=yes"),
    "qnli": ("{text_a} ? {mask}, {text_b}", "entailment=yes,not_entailment=no"),
    "rte": ("{text_a} ? {mask}, {text_b}", "entailment=yes,not_entailment=no"),
    "mnli": ("{text_a} ? {mask}, {text_b}", "entailment=yes,neutral=maybe,contradiction=no"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is the GLUE task name (default sst2)."""
  name = defaults.glue_task_name(arg or "sst2")
  if name not in PROMPTS:
    raise ValueError(f"configs/pet.py: no pattern for GLUE task {name!r}; choose one of "
                     f"{sorted(PROMPTS)}")
  config = defaults.finetune_config()
  config.task = "cloze"
  config.glue_task = name
  config.data.data_dir = "../shared/data"
  if name == "mnli":
    config.data.eval_splits = "dev_matched,dev_mismatched"
    config.data.predict_split = "test_matched"
  config.cloze = ml_collections.ConfigDict()
  config.cloze.pattern, config.cloze.verbalizer = PROMPTS[name]
  config.cloze.single_token = True  # every verbalizer word one vocabulary token
  config.cloze.head = "mlm"  # 'mlm': PET's cloze; 'cls': the [CLS] classifier, same subset
  config.cloze.k_per_class = 16  # 0 = the whole training split
  config.cloze.sample_seed = -1  # the subset's seed; -1 = config.seed
  # Few-shot recipe (LM-BFF's): lr 1e-5, batch 8, no warmup, many passes over
  # the small set; the best epoch on dev is kept, as for every fine-tuning run.
  config.optim.learning_rate = 1e-5
  config.train.batch_size = 8
  config.train.num_epochs = 30
  config.train.warmup_fraction = 0.0
  config.data.max_length = 128
  return config
