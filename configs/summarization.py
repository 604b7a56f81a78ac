"""Abstractive summarization fine-tuning (BART or T5), scored by ROUGE-1/2/L.

config.task 'summarization' (bert_jax/tasks/summarization.py, through the
text-to-text task): each document (for T5 after the 'summarize: ' prefix of
the T5 paper) is encoded, the decoder is trained teacher-forced on its
summary, and each epoch the eval split is decoded with beam search and
scored by ROUGE-1 / ROUGE-2 / ROUGE-L F-measure x 100 (rouge-score's
tokenization, Porter-stemmed); the best epoch is kept by rougeL.
Predictions (`bert-jax predict`) are JSONL files, one {"summary": ...} a line.

Data: data.data_dir holds train / validation / test files, JSONL (one object
a line; data.document_key and data.summary_key name the fields) or TSV
(document<TAB>summary). The defaults are CNN/DailyMail as the Hugging Face
`datasets` library writes it (`load_dataset('cnn_dailymail', '3.0.0')[split]
.to_json(f'{split}.jsonl')`: keys 'article' and 'highlights'). For XSum set
data.document_key=document, data.summary_key=summary,
data.max_target_length=64, decode.beam_size=6, decode.alpha=1.0 (fairseq's
XSum generation settings).

Variants:
  bart (default): a BART Hugging Face folder (facebook/bart-base or
    facebook/bart-large: config.json, model.safetensors, vocab.json,
    merges.txt). fairseq's CNN/DM fine-tuning recipe for BART: Adam(W) lr 3e-5,
    betas (0.9, 0.999), eps 1e-8, weight decay 0.01, gradient clipping 0.1,
    linear decay after 500 warmup updates of 20k (2.5%), label smoothing 0.1,
    dropout and attention dropout 0.1 (the checkpoint's own config), sources
    cut to 1,024 tokens; BART's CNN/DM generation: beam 4, length penalty 2.0,
    at least 55 and at most 142 tokens, no repeated trigram.
    Our beam search's length penalty is GNMT's ((5 + length) / 6) ** alpha,
    close to fairseq's length ** alpha at summary lengths.
  t5: a T5 folder (t5-small / t5-base, spiece.model) or a configs/t5.py run;
    the T5 paper's fine-tuning: Adafactor at a constant 1e-3, inputs 512,
    targets 114 (its CNN/DM lengths), beam 4 with alpha 0.6.

Launch (BART_FOLDER: facebook/bart-base downloaded, e.g. with
`huggingface-cli download facebook/bart-base --local-dir BART_FOLDER`):
  bert-jax finetune --config=configs/summarization.py:bart --workdir=/tmp/bart_cnndm \
    --config.init_from=BART_FOLDER --config.data.data_dir=CNNDM_DIR
  bert-jax evaluate --config=configs/summarization.py:bart --workdir=/tmp/bart_cnndm ...
  bert-jax predict --config=configs/summarization.py:bart --workdir=/tmp/bart_cnndm ...
  (T5: --config=configs/summarization.py:t5 --config.init_from=T5_FOLDER)
Expected (published, not measured here: the BART paper, table 3, BART-large
on CNN/DM): ROUGE-1 44.16, ROUGE-2 21.28, ROUGE-L 40.90. The paper's ROUGE-L
is the summary-level variant, our rougeLsum (an LCS per sentence); rougeL is
the whole-text LCS, which scores CNN/DM's multi-sentence summaries markedly
lower.
"""
import ml_collections

from bert_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'bart' (default) or 't5'."""
  family = arg or "bart"
  if family not in ("bart", "t5"):
    raise ValueError(f"configs/summarization.py: unknown variant {family!r}; choose bart or t5")
  config = defaults.finetune_config()
  config.family = family
  config.task = "summarization"
  config.model = defaults.model_config(family, "tiny" if family == "bart" else "t5_v1_1_tiny")
  config.data.tokenizer = ""  # init_from's vocab.json + merges.txt / spiece.model
  config.data.train_split = "train.jsonl"
  config.data.eval_splits = "validation.jsonl"
  config.data.predict_split = "test.jsonl"
  config.data.document_key = "article"  # CNN/DailyMail's fields
  config.data.summary_key = "highlights"
  config.data.padding = "bucket"
  config.data.pad_multiple = 64
  config.train.num_epochs = 3
  config.train.batch_size = 32
  config.eval.batch_size = 32
  config.decode.beam_size = 4

  if family == "bart":
    config.data.max_length = 1024  # BART's positions
    config.data.max_target_length = 142
    config.optim.learning_rate = 3e-5
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.01
    config.optim.clip_norm = 0.1
    config.train.warmup_fraction = 0.025  # 500 of 20k updates
    config.train.label_smoothing = 0.1
    config.decode.alpha = 2.0
    config.decode.min_length = 55
    config.decode.no_repeat_ngram = 3
  else:
    config.data.source_prefix = "summarize: "
    config.data.max_length = 512
    config.data.max_target_length = 114
    config.optim = defaults.optim_config("adafactor")
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.train.warmup_fraction = 0.0
    config.decode.alpha = 0.6
  return config
