"""Every config field of every job, with its default: the experiment record's schema.

Config files (configs/*.py) start from these functions and state only what
differs; the CLI locks the result, so a misspelt field is an error naming it.
Nothing here imports JAX, TensorFlow or orbax: loading a config is instant
and works on a machine without an accelerator runtime.

  train_config()       `bert-jax train` (pretraining)
  finetune_config()    `bert-jax finetune / evaluate / predict`
  data_config()        the pretraining input pipeline (`config.data`)
  optim_config(name)   the optimizer and its schedule (`config.optim`)
  model_config(family, preset, **overrides)
                       every field of a model preset (`config.model`)
"""
from __future__ import annotations

import ml_collections

from bert_jax import models

class ConfigError(ValueError):
  """A bad config field; the message is 'config.<key>: <what is wrong>'.

  A ValueError, so callers that catch bad input catch it; the CLI prints it
  as one line.
  """

  def __init__(self, key: str, message: str):
    super().__init__(f"config.{key}: {message}")
    self.key = key


# Original BERT excludes any name containing "bias" or "LayerNorm" (its
# output_bias too); our norms name their gain "scale".
DEFAULT_NO_DECAY = (r"bias|scale$|(?i:norm)",)

_OPTIM_COMMON = dict(
    learning_rate=1e-4, schedule="linear", warmup_steps=10_000,
    num_steps=0,  # 0: make_optimizer(num_steps=...) gives it (the run's total).
    end_factor=0.0,
    decay_steps=0, decay_shape="sqrt",  # the cool-down of schedule 'wsd'
    weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0,
    bias_correction=True,  # False: original BERT's AdamWeightDecayOptimizer.
    decay_rate=0.8, momentum=0.0, factored=True, multiply_by_parameter_scale=True,
    clipping_threshold=1.0, min_dim_size_to_factor=128,
    no_decay=DEFAULT_NO_DECAY, freeze=(), lr_multipliers=())
OPTIM_PRESETS = {
    # BERT run_pretraining.py.
    "adamw": dict(name="adamw"),
    # ALBERT: LAMB, lr 0.00176 at batch 4096, 3125 warmup steps.
    "lamb": dict(name="lamb", learning_rate=0.00176, warmup_steps=3125),
    # t5x pretraining: "constant * rsqrt_decay", base 1.0, 10k warmup, no
    # global clipping (Adafactor clips each update's RMS to 1 itself).
    "adafactor": dict(name="adafactor", learning_rate=1.0, schedule="rsqrt",
                      weight_decay=0.0, clip_norm=0.0),
}


def optim_config(name: str = "adamw") -> ml_collections.ConfigDict:
  """Every optimizer field, with the published defaults of `name`'s model family.

  adamw: BERT (lr 1e-4, linear warmup 10k then linear decay to 0, decay 0.01,
  b1 0.9, b2 0.999, eps 1e-6, clip 1.0). lamb: ALBERT (lr 0.00176, 3125 warmup
  steps). adafactor: t5x (lr 1.0 under rsqrt, 10k warmup, decay_rate 0.8, no
  momentum, factored, no weight decay, no global clipping). Fields an
  optimizer does not use are ignored by it: b1/b2/eps/bias_correction by adafactor,
  decay_rate/momentum/factored/multiply_by_parameter_scale/
  clipping_threshold/min_dim_size_to_factor by adamw and lamb.

  Args:
    name: one of OPTIM_PRESETS.

  Returns:
    A ConfigDict to put at `config.optim` and override field by field.
  """
  if name not in OPTIM_PRESETS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIM_PRESETS)}")
  return ml_collections.ConfigDict({**_OPTIM_COMMON, **OPTIM_PRESETS[name]})


def model_config(family: str, preset: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` sub-config: every field of the family's preset, overridable.

  `vocab_size=0` means "the tokenizer's size, rounded up to a multiple of
  128" (filled in at start-up).
  """
  return ml_collections.ConfigDict(models.model_config(family, preset, **overrides))


def data_config() -> ml_collections.ConfigDict:
  """The pretraining pipeline's `data` sub-config (locked).

  The run seed and the global batch size live elsewhere (config.seed,
  config.train.batch_size) and reach the pipeline as arguments.
  """
  c = ml_collections.ConfigDict()
  c.source = "builtin:pydoc_topics"  # file path/glob, 'tfds:NAME[/CONFIG]:KEY', 'builtin:NAME'
  c.data_dir = ""  # tfds data folder ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.split = "train"  # tfds split
  c.tokenizer = ""  # vocab.txt (WordPiece) or .model (SentencePiece), or a folder;
  #                   '' = train a SentencePiece model on `source` (tokenizer.train_for_source)
  c.vocab_size = 8000  # pieces of that trained model (unused when `tokenizer` is set)
  c.lower_case = True  # WordPiece: uncased vocabulary
  c.objective = "mlm"  # 'mlm' (RoBERTa full sentences) | 'mlm_nsp' | 'mlm_sop' | 'span_corruption'
  #                      | 'denoising' (BART: text infilling at mask_rate, random_prob, ...)
  c.masking = "token"  # 'token' | 'whole_word' | 'span' (SpanBERT) | 'ngram' (ALBERT)
  c.mask_rate = 0.15  # fraction of tokens predicted
  c.mask_prob = 0.8  # chosen token -> [MASK]
  c.random_prob = 0.1  # chosen token -> random token (the rest stays)
  c.seq_length = 128  # encoder length; span_corruption: inputs length (e.g. 512)
  # mlm: per-document [CLS] chunk [SEP] examples packed into rows with segment ids
  # (attention stays in its document, positions restart; ModernBERT's unpadding)
  c.pack = False
  c.max_predictions = 20  # width of mlm_positions/targets/weights
  c.short_seq_prob = 0.1  # mlm_nsp/mlm_sop: P(target length random in [2, seq_length - 3])
  #                       instead of seq_length - 3, as original BERT (fewer train/fine-tune
  #                       length mismatches)
  c.noise_density = 0.15  # span corruption
  c.mean_noise_span_length = 3.0  # span corruption
  # denoising (BART; mask_rate = words infilled, random_prob = span -> random id):
  c.poisson_lambda = 3.0  # mean infilled span length in words (fairseq's recipe: 3.5)
  c.permute_sentences = 1.0  # fraction of sentences shuffled
  c.delete_ratio = 0.0  # token deletion
  c.rotate_ratio = 0.0  # P(document rotation)
  c.extra_ids = 100  # sentinels appended to a SentencePiece vocabulary
  c.group_size = 64  # documents tokenized and chunked together (resume unit)
  c.num_shards = 8  # data shards (fixes the stream; a multiple of the host count)
  c.shuffle = True  # shuffle documents per epoch
  c.shuffle_buffer = 1024  # documents per shuffle block
  c.lock()
  return c


def _mesh() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1  # -1: the devices the other axes leave
  c.fsdp = 1
  c.tensor = 1
  c.rules = "data_parallel"  # 'data_parallel' | 'fsdp' | 'fsdp_tensor'
  return c


def train_config() -> ml_collections.ConfigDict:
  """The pretraining job's fields with their defaults; config files set model, data, optim.

  Every key the loop reads is here, so a locked config rejects typos.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "bert"  # a key of bert_jax.models.FAMILIES
  # Continued pretraining (DAPT/TAPT): a Hugging Face folder or a bert-jax train
  # workdir to start from (its weights, tokenizer and architecture; a fresh
  # optimizer and data position). '' = random init. A resumed run restores its
  # own checkpoint instead.
  c.init_from = ""
  c.model = model_config("bert", "tiny")
  c.data = data_config()
  c.optim = optim_config("adamw")

  c.train = ml_collections.ConfigDict()
  # The loss: a key of objectives.OBJECTIVES; '' = the one named like data.objective.
  c.train.objective = ""
  c.train.num_steps = 1_000_000  # with the adamw preset: BERT's 1M steps, 10k warmup
  c.train.batch_size = 32  # global, over all hosts
  c.train.num_microbatches = 1  # gradient accumulation (same update as the full batch)
  c.train.z_loss = 0.0  # T5: 1e-4
  # Label smoothing of the seq2seq term (t5x's option; BART's fine-tuning 0.1);
  # training only, the held-out loss stays the plain cross entropy.
  c.train.label_smoothing = 0.0
  # The dropout masks' PRNG: 'auto' (rbg on TPU, as t5x; threefry2x32
  # elsewhere), 'threefry2x32', 'rbg' or 'unsafe_rbg'. Each step's masks are a
  # function of (seed, step) whichever is chosen, so a resumed run is exact.
  c.train.prng_impl = "auto"
  # Distillation (objective 'distillation'): the teacher, a Hugging Face
  # *ForMaskedLM / *ForPreTraining folder or a bert-jax train workdir. The
  # run fills in teacher_model (its architecture) and keeps the teacher frozen.
  c.train.teacher = ""
  c.train.teacher_model = ml_collections.ConfigDict()

  c.mesh = _mesh()

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.progress = True  # console progress bar (process 0)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500  # 0: never (the final step is always evaluated if a source is set)
  c.eval.source = ""  # held-out source spec ('' = no eval); same tokenizer/objective as data
  c.eval.split = "validation"  # tfds split of a tfds eval source
  c.eval.batch_size = 32
  c.eval.num_batches = 8
  return c


# GLUE task names (tasks/glue.TASKS has the tasks; a test keeps the two equal).
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax")
_GLUE_ALIASES = {"sts-b": "stsb", "sst-2": "sst2", "diagnostic": "ax"}


def glue_task_name(name: str) -> str:
  """The GLUE task key of `name` ('sst2', 'SST-2', 'STS-B', ...); unknown names are errors."""
  key = _GLUE_ALIASES.get(name.lower(), name.lower())
  if key not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(GLUE_TASKS)}")
  return key


def finetune_config() -> ml_collections.ConfigDict:
  """Every field the fine-tuning loop reads, with defaults; config files set the task."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "bert"  # 'bert': an encoder + task head; an encoder-decoder family: text-to-text
  c.task = "glue"  # one of tasks.adapters.TASKS: glue, conll, squad
  c.glue_task = "sst2"  # glue only: a key of glue.TASKS
  c.init_from = ""  # HF folder or bert_jax pretraining workdir; '' = random init of `model`
  c.dtype = "float32"  # computation dtype (params stay float32)
  c.model = model_config("bert", "tiny")  # used only when init_from is ''

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""  # glue: the GLUE root (or tfds data_dir); conll/squad: the files' folder
  c.data.glue_source = "tsv"  # glue: 'tsv' (GLUE folders) or 'tfds' (prepared glue/<task>)
  c.data.tokenizer = ""  # vocab.txt or folder; '' = init_from's (folder or pretraining run's)
  c.data.lower_case = True
  c.data.train_split = "train"
  c.data.eval_splits = "dev"  # comma-separated
  c.data.predict_split = "test"
  c.data.max_length = 128  # encoder tokens (T5: input ids + EOS)
  c.data.max_target_length = 64  # t5: target ids + EOS
  c.data.max_train_examples = 0  # 0 = all: the first N examples otherwise
  c.data.max_eval_examples = 0
  c.data.padding = "bucket"  # 'max' | 'dynamic' | 'bucket'
  c.data.pad_multiple = 32
  c.data.label_all_subwords = False  # conll
  c.data.doc_stride = 128  # squad
  c.data.max_query_length = 64  # squad
  c.data.n_best_size = 20  # squad
  c.data.max_answer_length = 30  # squad
  c.data.source_prefix = ""  # summarization: put before each document (T5: 'summarize: ')
  c.data.document_key = "document"  # summarization JSONL keys (XSum's; CNN/DM: 'article',
  c.data.summary_key = "summary"  # 'highlights'); TSV files are document<TAB>summary

  c.finetune = ml_collections.ConfigDict()
  c.finetune.freeze_encoder = False
  c.finetune.freeze_layers = 0  # freeze the embeddings and the lowest N layers
  c.finetune.reinit_layers = 0  # top K layers (and pooler) start fresh
  c.finetune.layerwise_lr_decay = 1.0  # 1.0 = off
  c.finetune.ner_head = "softmax"  # conll: 'softmax' | 'crf' (linear-chain CRF) | 'span'
  c.finetune.max_span_length = 8  # conll, ner_head='span': longest span in words
  # Encoder-decoders: 'classification' (BART on GLUE: its sequence-classification head),
  # 'text2text' (the decoder writes the label) or 'auto' (the head where the family has one).
  c.finetune.head = "auto"
  # 'full' | 'lora' | 'bitfit' | 'prompt' | 'houlsby' | 'pfeiffer' (peft.py, peft_modules.py;
  # 'scalar_mix': a frozen encoder, the head reads an ELMo mix of all layers, frozen_features.py;
  # the task head always trains)
  c.finetune.method = "full"
  c.finetune.lora_rank = 8  # r of the factors A [fan_in, r], B [r, fan_out]
  c.finetune.lora_alpha = 16.0  # the delta is scaled by alpha / r
  # '/'-joined kernel paths given LoRA factors: the attention projections of BERT
  # (encoder/layer_i/attention/...) and T5 (encoder/layers_i/attention/...,
  # decoder/layers_i/{self,encoder_decoder}_attention/...).
  c.finetune.lora_targets = r"(query|key|value|out)/kernel$"
  c.finetune.prompt_length = 20  # method 'prompt': soft-prompt vectors before the tokens
  c.finetune.adapter_size = 64  # methods 'houlsby' / 'pfeiffer': adapter bottleneck width
  # Gradual unfreezing (frozen_features.py; method 'full'): (step, regex) stages, a
  # parameter trains from the smallest step whose regex matches it (0 when none does),
  # e.g. ((0, 'classifier|layer_11/'), (500, 'norm/'), (1000, '.*')); or the preset
  # 'top_ln_all': head + pooler + top layer, then LayerNorms at unfreeze_steps[0], then
  # everything at unfreeze_steps[1].
  c.finetune.unfreeze = ()
  c.finetune.unfreeze_schedule = ""  # '' | 'top_ln_all'
  c.finetune.unfreeze_steps = ()  # (s1, s2) for unfreeze_schedule

  c.optim = optim_config("adamw")  # weight decay 0.01, no decay on norms and biases
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 0  # replaced by train.warmup_fraction when that is > 0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 3
  c.train.batch_size = 32
  c.train.warmup_fraction = 0.1
  c.train.prng_impl = "auto"  # dropout masks' PRNG, as in train_config()
  # Text-to-text heads: label smoothing of the decoder's cross entropy
  # (fairseq's BART recipes: 0.1); the dev loss and metrics are unsmoothed.
  c.train.label_smoothing = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64

  c.decode = ml_collections.ConfigDict()  # encoder-decoders: how eval / predict decode
  c.decode.beam_size = 1  # 1 = greedy
  c.decode.alpha = 0.6  # beam search length penalty exponent
  c.decode.max_decode_length = 0  # 0 = data.max_target_length
  # Constraints (bert_jax/decoding.py): EOS not before min_length tokens, and no
  # repeated n-gram of this size (0 = none); BART's CNN/DM generation: 55, 3.
  c.decode.min_length = 0
  c.decode.no_repeat_ngram = 0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1  # the last state, for resuming (always after the last epoch)

  c.mesh = _mesh()

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.progress = True
  return c
