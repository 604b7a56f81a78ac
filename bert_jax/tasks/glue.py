"""GLUE: readers (GLUE TSV folders, offline tfds), features, metrics, submission files.

Readers. `read_tsv(data_dir, task, split)` reads the TSV files exactly as the
GLUE benchmark distributes them (download_glue_data.py layout):

  task  folder  train/dev columns (header)                         test columns
  cola  CoLA    no header: source, label, author mark, sentence    index, sentence
  sst2  SST-2   sentence, label                                    index, sentence
  mrpc  MRPC    Quality, #1 ID, #2 ID, #1 String, #2 String        index, #1 ID, #2 ID, #1 String, #2 String
  stsb  STS-B   index, genre, filename, year, old_index, source1,  the same without score
                source2, sentence1, sentence2, score
  qqp   QQP     id, qid1, qid2, question1, question2, is_duplicate id, question1, question2
  mnli  MNLI    index, promptID, pairID, genre, 4 parse columns,   the same without labels
                sentence1, sentence2, label1[..label5], gold_label
  qnli  QNLI    index, question, sentence, label                   index, question, sentence
  rte   RTE     index, sentence1, sentence2, label                 index, sentence1, sentence2
  wnli  WNLI    index, sentence1, sentence2, label                 index, sentence1, sentence2
  ax    diagnostic  (test only, diagnostic.tsv)                    index, sentence1, sentence2

Files with a header are read by column NAME (so MNLI's train file, with one
annotator label, and its dev files, with five, both work), every row must have
as many fields as the header, and fields are split on tabs only: GLUE files use
no CSV quoting (a field may start with a '"'). A leading UTF-8 BOM is ignored.
MNLI's splits are train, dev_matched, dev_mismatched, test_matched,
test_mismatched; the other tasks have train, dev, test. `split.tsv.gz` is read
when `split.tsv` is absent.

`read_tfds(task, split, data_dir)` reads tfds `glue/<task>` from a prepared
data_dir with `tfds.builder_from_directory` (never downloads); tfds class ids
are mapped to this module's label names, whose order is the TSV one
(BERT's run_classifier order; tfds orders MNLI differently).

Features are original BERT's: `[CLS] A [SEP] B [SEP]`, token types 0 for
[CLS] A [SEP] and 1 for B [SEP], the longer of A and B truncated first
(truncate_seq_pair), named by the batch contract, unpadded: batch them with
bert_jax.tasks.batching (dynamic padding, length bucketing). The layout is the
tokenizer's own (`build_inputs`): a RoBERTa BPE vocabulary gives
`<s> A </s></s> B </s>` with all token types 0; pad those with its pad_id.

Metrics are the GLUE ones: accuracy; F1 of the positive class + accuracy
(MRPC, QQP); Matthews correlation (CoLA, AX); Pearson + Spearman with average
ranks for ties (STS-B); MNLI accuracy per dev split (matched/mismatched).
compute_metrics and split_metrics (here, since they read a task's metric names)
call the numpy metric functions of bert_jax.tasks.glue_metrics.
"""
import dataclasses
import gzip
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from bert_jax.tasks import glue_metrics

Column = Union[int, str]


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the fields of one kind of GLUE file sit: header names, or indices."""
  text_a: Column
  text_b: Optional[Column] = None
  label: Optional[Column] = None
  index: Optional[Column] = None
  num_columns: Optional[int] = None  # headerless files only

  @property
  def header(self) -> bool:
    return self.num_columns is None


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: its files, labels, metrics and tfds name.

  Attributes:
    name: short name ('sst2', 'mnli', ...), the key of TASKS.
    folder: its folder in the GLUE distribution ('SST-2', 'MNLI', ...).
    label_names: class names in label-id order as written in the TSV
      files; empty for the regression task STS-B.
    metrics: names of the metrics it reports (keys of compute_metrics).
    files: split name -> file name.
    labelled: layout of the labelled (train/dev) files.
    unlabelled: layout of the test files.
    tfds_name: 'glue/<config>'.
    tfds_keys: tfds feature names of text A and text B (None for one sentence).
    submission: test split -> file name in a GLUE submission zip.
  """
  name: str
  folder: str
  label_names: Tuple[str, ...]
  metrics: Tuple[str, ...]
  files: Mapping[str, str]
  labelled: Optional[_Layout]
  unlabelled: _Layout
  tfds_name: str
  tfds_keys: Tuple[str, Optional[str]]
  submission: Mapping[str, str]

  @property
  def is_regression(self) -> bool:
    return not self.label_names

  @property
  def num_labels(self) -> int:
    """Width of the classifier head (1 for regression)."""
    return len(self.label_names) or 1

  @property
  def is_pair(self) -> bool:
    return self.unlabelled.text_b is not None

  @property
  def dev_splits(self) -> Tuple[str, ...]:
    return tuple(s for s in self.files if s.startswith("dev"))

  @property
  def test_splits(self) -> Tuple[str, ...]:
    return tuple(s for s in self.files if s.startswith("test"))

  @property
  def primary_metric(self) -> str:
    """The metric to select checkpoints by (the first one GLUE reports)."""
    return self.metrics[0]


_SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
_MNLI_SPLITS = {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                "dev_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                "test_mismatched": "test_mismatched.tsv"}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MNLI = ("contradiction", "entailment", "neutral")


def _pair(a, b, label, index="index"):
  return _Layout(a, b, label), _Layout(a, b, None, index)


TASKS: Dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", _BINARY, ("mcc",), _SPLITS,
             _Layout(text_a=3, label=1, num_columns=4), _Layout("sentence", index="index"),
             "glue/cola", ("sentence", None), {"test": "CoLA.tsv"}),
    GlueTask("sst2", "SST-2", _BINARY, ("accuracy",), _SPLITS,
             _Layout("sentence", label="label"), _Layout("sentence", index="index"),
             "glue/sst2", ("sentence", None), {"test": "SST-2.tsv"}),
    GlueTask("mrpc", "MRPC", _BINARY, ("f1", "accuracy"), _SPLITS,
             *_pair("#1 String", "#2 String", "Quality"),
             "glue/mrpc", ("sentence1", "sentence2"), {"test": "MRPC.tsv"}),
    GlueTask("stsb", "STS-B", (), ("pearson", "spearman"), _SPLITS,
             *_pair("sentence1", "sentence2", "score"),
             "glue/stsb", ("sentence1", "sentence2"), {"test": "STS-B.tsv"}),
    GlueTask("qqp", "QQP", _BINARY, ("f1", "accuracy"), _SPLITS,
             *_pair("question1", "question2", "is_duplicate", index="id"),
             "glue/qqp", ("question1", "question2"), {"test": "QQP.tsv"}),
    GlueTask("mnli", "MNLI", _MNLI, ("accuracy",), _MNLI_SPLITS,
             *_pair("sentence1", "sentence2", "gold_label"),
             "glue/mnli", ("premise", "hypothesis"),
             {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}),
    GlueTask("qnli", "QNLI", _NLI2, ("accuracy",), _SPLITS,
             *_pair("question", "sentence", "label"),
             "glue/qnli", ("question", "sentence"), {"test": "QNLI.tsv"}),
    GlueTask("rte", "RTE", _NLI2, ("accuracy",), _SPLITS,
             *_pair("sentence1", "sentence2", "label"),
             "glue/rte", ("sentence1", "sentence2"), {"test": "RTE.tsv"}),
    GlueTask("wnli", "WNLI", _BINARY, ("accuracy",), _SPLITS,
             *_pair("sentence1", "sentence2", "label"),
             "glue/wnli", ("sentence1", "sentence2"), {"test": "WNLI.tsv"}),
    # The diagnostic set: MNLI-trained models predict it; scored by Matthews corr.
    GlueTask("ax", "diagnostic", _MNLI, ("mcc",), {"test": "diagnostic.tsv"},
             None, _Layout("sentence1", "sentence2", None, "index"),
             "glue/ax", ("premise", "hypothesis"), {"test": "AX.tsv"}),
]}

# Also accepted as task names: the GLUE folder names and common spellings.
_ALIASES = {"sts-b": "stsb", "sst-2": "sst2", "diagnostic": "ax"}


def get_task(name: Union[str, GlueTask]) -> GlueTask:
  """The GlueTask called `name` ('sst2', 'SST-2', 'STS-B', 'mnli', ...)."""
  if isinstance(name, GlueTask):
    return name
  key = name.lower()
  key = _ALIASES.get(key, key)
  if key not in TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(TASKS)}")
  return TASKS[key]


@dataclasses.dataclass(frozen=True)
class GlueExample:
  """One GLUE example.

  Attributes:
    guid: where it came from, 'file:line' (TSV) or 'tfds folder[split]#i'.
    index: the test file's index/id column (GLUE submissions are keyed by
      it); for files without one, the 0-based row number.
    text_a: first sentence.
    text_b: second sentence, None for single-sentence tasks.
    label: class name (str), the float score (STS-B), or None (test files).
  """
  guid: str
  index: int
  text_a: str
  text_b: Optional[str]
  label: Union[str, float, None]


# ----------------------------------------------------------------------------
# TSV reader
# ----------------------------------------------------------------------------

def _find_file(data_dir: str, task: GlueTask, split: str) -> str:
  """data_dir may be the GLUE root (holding task folders) or the task folder."""
  if split not in task.files:
    raise ValueError(f"GLUE task {task.name} has no split {split!r}; it has {list(task.files)}")
  name = task.files[split]
  tried = []
  for folder in (os.path.join(data_dir, task.folder), os.path.join(data_dir, task.name),
                 data_dir):
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
      if os.path.isfile(path):
        return path
      tried.append(path)
  raise FileNotFoundError(f"GLUE {task.name} split {split}: none of {tried} exists")


def _lines(path: str) -> Iterable[Tuple[int, str]]:
  """(1-based line number, line without its end) of a plain or gzip UTF-8 file."""
  opener = gzip.open if path.endswith(".gz") else open
  # newline="\n": only LF ends a line, so a stray CR or U+2028 in a sentence
  # stays inside its field; utf-8-sig drops MRPC's byte-order mark.
  with opener(path, "rt", encoding="utf-8-sig", newline="\n") as f:
    for number, line in enumerate(f, 1):
      yield number, line.rstrip("\n").rstrip("\r")


def _column_indices(layout: _Layout, header: Optional[List[str]], path: str) -> Dict[str, int]:
  out = {}
  for field in ("text_a", "text_b", "label", "index"):
    col = getattr(layout, field)
    if col is None:
      continue
    if isinstance(col, str):
      if col not in header:
        raise ValueError(f"{path}:1: header {header} has no column {col!r} (the {field} of "
                         "this GLUE task); is this the right task's file?")
      col = header.index(col)
    out[field] = col
  return out


def _parse_label(task: GlueTask, raw: str, where: str) -> Union[str, float]:
  raw = raw.strip()
  if task.is_regression:
    try:
      value = float(raw)
    except ValueError:
      value = math.nan
    if not math.isfinite(value):
      raise ValueError(f"{where}: {task.name} label {raw!r} is not a finite number")
    return value
  if raw not in task.label_names:
    raise ValueError(f"{where}: label {raw!r} is not in the {task.name} label set "
                     f"{list(task.label_names)}")
  return raw


def read_tsv(data_dir: str, task: Union[str, GlueTask], split: str) -> List[GlueExample]:
  """All examples of one split of a GLUE task, from its TSV file.

  Args:
    data_dir: the GLUE data root (holding CoLA/, SST-2/, ...) or the task's
      own folder.
    task: task name or GlueTask.
    split: 'train', 'dev', 'test' (MNLI: 'dev_matched', 'test_mismatched', ...).

  Returns:
    The examples in file order; test examples have label None.

  Raises:
    FileNotFoundError if the file is absent; ValueError naming file:line for
    a row with the wrong number of columns, a label outside the label set (or
    a non-numeric STS-B score), a header lacking a column, or no examples.
  """
  task = get_task(task)
  path = _find_file(data_dir, task, split)
  layout = task.unlabelled if split.startswith("test") else task.labelled
  lines = iter(_lines(path))
  width, header = layout.num_columns, None
  if layout.header:
    first = next(lines, None)
    if first is None:
      raise ValueError(f"{path}: empty file (no header, no examples)")
    header = first[1].split("\t")
    width = len(header)
  cols = _column_indices(layout, header, path)
  examples = []
  for number, line in lines:
    if not line:
      continue  # a blank line holds no example
    fields = line.split("\t")
    where = f"{path}:{number}"
    if len(fields) != width:
      raise ValueError(f"{where}: {len(fields)} tab-separated columns, expected {width} "
                       f"({task.name} {split})")
    if "index" in cols:
      try:
        index = int(fields[cols["index"]])
      except ValueError:
        raise ValueError(f"{where}: index {fields[cols['index']]!r} is not an integer") from None
    else:
      index = len(examples)
    examples.append(GlueExample(
        guid=where, index=index, text_a=fields[cols["text_a"]],
        text_b=fields[cols["text_b"]] if "text_b" in cols else None,
        label=_parse_label(task, fields[cols["label"]], where) if "label" in cols else None))
  if not examples:
    raise ValueError(f"{path}: no examples ({task.name} split {split} is empty)")
  return examples


# ----------------------------------------------------------------------------
# tfds reader (offline)
# ----------------------------------------------------------------------------

def tfds_split(task: GlueTask, split: str) -> str:
  """The tfds split name of a GLUE split ('dev' -> 'validation', ...)."""
  return split.replace("dev", "validation", 1) if split.startswith("dev") else split


def read_tfds(task: Union[str, GlueTask], split: str,
              data_dir: Optional[str] = None) -> List[GlueExample]:
  """All examples of tfds `glue/<task>` from a prepared data_dir; never downloads.

  Args:
    task: task name or GlueTask.
    split: GLUE split name ('train', 'dev', 'dev_matched', ...) or the tfds
      one ('validation', 'validation_matched', ...).
    data_dir: tfds data folder (default $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    Examples in GLUE file order (by tfds `idx`, their `index`), guid
    'folder[split]#i', labels as this module's label names (None where tfds
    stores -1, i.e. the test splits).

  Raises:
    FileNotFoundError when glue/<task> is not prepared there; ValueError for
    an unknown or empty split or a class name outside the label set.
  """
  from bert_jax import host_tf  # heavy import (TensorFlow): only when used
  from bert_jax.data import sources
  tfds = host_tf.datasets()
  task = get_task(task)
  data_dir = os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  folder = sources.tfds_folder(task.tfds_name, data_dir)
  builder = tfds.builder_from_directory(folder)
  name = tfds_split(task, split)
  if name not in builder.info.splits:
    raise ValueError(f"tfds {task.tfds_name} in {folder} has no split {name!r}; it has "
                     f"{sorted(builder.info.splits)}")
  if builder.info.splits[name].num_examples == 0:
    raise ValueError(f"tfds {task.tfds_name} split {name} in {folder} is empty")
  feature = builder.info.features["label"]
  class_names = list(getattr(feature, "names", []) or [])
  key_a, key_b = task.tfds_keys
  examples = []
  for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=name, shuffle_files=False))):
    where = f"{folder}[{name}]#{i}"
    examples.append(GlueExample(
        guid=where, index=int(ex["idx"]), text_a=ex[key_a].decode("utf-8"),
        text_b=ex[key_b].decode("utf-8") if key_b else None,
        label=_tfds_label(task, ex["label"], class_names, where)))
  # tfds stores examples shuffled by a hash of their key; `idx` is the row of
  # the GLUE file, so sorting by it gives the TSV order (and the same batches).
  return sorted(examples, key=lambda e: e.index)


def _tfds_label(task: GlueTask, value, class_names: List[str], where: str):
  if task.is_regression:
    value = float(value)
    return None if value == -1.0 else value
  value = int(value)
  if value == -1:
    return None
  name = class_names[value] if 0 <= value < len(class_names) else str(value)
  if name in task.label_names:
    return name
  # tfds names binary classes in words ('negative', 'equivalent', ...); the
  # GLUE files write their class ids.
  if task.label_names == _BINARY and str(value) in _BINARY:
    return str(value)
  raise ValueError(f"{where}: tfds class {value} ({name!r}) is not in the {task.name} label "
                   f"set {list(task.label_names)}")


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

def token_ids(tokenizer, texts: Sequence[str], chunk: int = 4096) -> List[np.ndarray]:
  """Word-piece ids of each text (no [CLS]/[SEP]), tokenized in chunks in TF."""
  out = []
  for start in range(0, len(texts), chunk):
    ragged = tokenizer.tokenize(list(texts[start:start + chunk]))
    flat, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
    out.extend(flat[splits[i]:splits[i + 1]] for i in range(len(splits) - 1))
  return out


def truncate_pair(a: np.ndarray, b: Optional[np.ndarray],
                  max_tokens: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Original BERT's truncate_seq_pair: drop the last token of the longer (B on ties)."""
  if b is None:
    return a[:max_tokens], None
  len_a, len_b = len(a), len(b)
  while len_a + len_b > max_tokens:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return a[:len_a], b[:len_b]


def encode_examples(examples: Sequence[GlueExample], tokenizer,
                    task: Union[str, GlueTask], *, max_length: int = 128
                    ) -> List[Dict[str, np.ndarray]]:
  """BERT features of each example, unpadded, in example order.

  Args:
    examples: from read_tsv / read_tfds.
    tokenizer: a bert_jax.data.tokenizer Tokenizer with [CLS] and [SEP]
      (or <s> and </s>); its `build_inputs` lays out the special tokens.
    task: the task (for label ids and pair/single).
    max_length: tokens per example, special tokens included.

  Returns:
    One dict per example: 'encoder_input_tokens' and 'encoder_type_ids' int32
    [length <= max_length]; 'classifier_labels' a scalar, int32 class id
    (float32 score for STS-B), -1 for unlabelled (test) examples.
  """
  task = get_task(task)
  if tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise ValueError(f"GLUE features need [CLS] and [SEP]; vocabulary {tokenizer.path} "
                     "lacks one")
  specials = tokenizer.num_special_tokens(task.is_pair)
  if max_length <= specials:
    raise ValueError(f"max_length {max_length} leaves no room for text ({specials} special "
                     "tokens)")
  ids_a = token_ids(tokenizer, [e.text_a for e in examples])
  ids_b = (token_ids(tokenizer, [e.text_b or "" for e in examples]) if task.is_pair
           else [None] * len(examples))
  features = []
  for ex, a, b in zip(examples, ids_a, ids_b):
    a, b = truncate_pair(a, b, max_length - specials)
    tokens, types = tokenizer.build_inputs(a, b)
    features.append({"encoder_input_tokens": tokens, "encoder_type_ids": types,
                     "classifier_labels": label_id(task, ex.label)})
  return features


def label_id(task: Union[str, GlueTask], label) -> np.ndarray:
  """Scalar label array: class id int32 / score float32; -1 when label is None."""
  task = get_task(task)
  if task.is_regression:
    return np.float32(-1.0 if label is None else label)
  if label is None:
    return np.int32(-1)
  if label not in task.label_names:
    raise ValueError(f"label {label!r} is not in the {task.name} label set "
                     f"{list(task.label_names)}")
  return np.int32(task.label_names.index(label))


# ----------------------------------------------------------------------------
# Task metrics
# ----------------------------------------------------------------------------

def compute_metrics(task: Union[str, GlueTask], predictions, labels) -> Dict[str, float]:
  """The metrics GLUE reports for `task`, plus accuracy for every classification task.

  Args:
    task: task name or GlueTask.
    predictions: class ids [n] or logits [n, num_labels]; scores [n] or
      [n, 1] for STS-B.
    labels: label ids [n] (floats for STS-B), e.g. the features'
      'classifier_labels'.

  Returns:
    {metric: value} with the task's metrics (see TASKS) and 'score', their
    mean (GLUE averages a task's metrics into its score). MNLI: call it once
    per dev split (see split_metrics).
  """
  task = get_task(task)
  names = task.metrics
  if not task.is_regression and "accuracy" not in names:
    names += ("accuracy",)
  out = {name: glue_metrics.METRICS[name](predictions, labels) for name in names}
  out["score"] = float(np.mean([out[m] for m in task.metrics]))
  return out


def split_metrics(task: Union[str, GlueTask],
                  results: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, float]:
  """compute_metrics for several splits, keys 'split/metric'.

  For MNLI, results {'dev_matched': (p, y), 'dev_mismatched': (p, y)} give
  'dev_matched/accuracy' and 'dev_mismatched/accuracy'.
  """
  return {f"{split}/{k}": v for split, (p, y) in results.items()
          for k, v in compute_metrics(task, p, y).items()}


# ----------------------------------------------------------------------------
# Submission files
# ----------------------------------------------------------------------------

def write_predictions(path: str, task: Union[str, GlueTask], examples: Sequence[GlueExample],
                      predictions) -> None:
  """Writes a GLUE submission TSV: header 'index\\tprediction', one row per example.

  Classification rows hold the label name ('1', 'entailment', ...), STS-B the
  score with 3 decimals. The file name GLUE expects is
  `task.submission[split]` (e.g. 'SST-2.tsv', 'MNLI-m.tsv').

  Args:
    path: output file.
    task: task name or GlueTask.
    examples: the examples predicted (their `index` keys the rows).
    predictions: class ids [n] / logits [n, num_labels], or scores [n]/[n, 1].
  """
  task = get_task(task)
  p = np.asarray(predictions)
  if task.is_regression:
    values = [f"{v:.3f}" for v in glue_metrics.regression_scores(p)]
  else:
    ids = glue_metrics.class_ids(p)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= task.num_labels:
      raise ValueError(f"{task.name} predictions must be class ids in [0, {task.num_labels})")
    values = [task.label_names[int(i)] for i in ids]
  if len(values) != len(examples):
    raise ValueError(f"{len(values)} predictions for {len(examples)} examples")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("index\tprediction\n")
    for ex, value in zip(examples, values):
      f.write(f"{ex.index}\t{value}\n")
