"""Cloze-style few-shot classification: PET (Schick & Schuetze 2021) on GLUE tasks.

A classification example is rewritten as a fill-in-the-blank text by a
*pattern* and read off the pretrained masked-LM head by a *verbalizer*:

  SST-2  pattern '{text_a} It was {mask}.'  verbalizer '0=terrible,1=great'
  RTE    pattern '{text_a} ? {mask}, {text_b}'  verbalizer 'entailment=yes,not_entailment=no'

The model is the family's masked LM (`model_task = 'mlm'`) with its MLM
head kept from `init_from` (finetune_init keeps it when the task says
`uses_mlm_head`); the batch gives the mask's position(s) as `mlm_positions`,
so the vocabulary projection runs there only. A label's score is its
verbalizer's log-probability at the mask; training is cross entropy of the
softmax over the labels' scores, which for single-token verbalizers is
exactly PET's softmax restricted to the verbalizer tokens (the full
softmax's normaliser is the same for every label and cancels). Prediction
is the argmax of the scores. PET's auxiliary MLM loss is not used.

The pattern language (`config.cloze.pattern`): literal text with the
placeholders {text_a}, {text_b} (pair tasks), {mask} (exactly once) and,
optionally, {sep}: what precedes it is segment A and what follows segment
B ([CLS] A [SEP] B [SEP], token types 0/1); without it the whole text is
segment A. Text fields are truncated (longest first) to fit
`data.max_length`; the pattern's own tokens and the mask are never cut.

The verbalizer (`config.cloze.verbalizer`): 'label=word,label=word|word'
over the task's label names ('0'/'1', 'entailment', ...). Several words of
one label (PET's multiple verbalizations) average their scores. With
`cloze.single_token` every word must be one vocabulary token (the main
case); otherwise {mask} becomes as many [MASK]s as the longest word has
tokens, and a word's score is the MEAN of the log-probabilities of its
tokens, token j read at mask j (length-normalised, so long words are not
penalised for their length; the unused trailing masks are ignored).

Few-shot: `cloze.k_per_class` > 0 trains on k examples of each label drawn
from the training split by a numpy generator seeded with `cloze.sample_seed`
(-1: `config.seed`), so the subset is a function of the seed alone.
`cloze.head = 'cls'` trains the standard [CLS] classifier on the same subset
(the baseline PET is compared with; bench/pet_fewshot.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import losses
from bert_jax import objectives
from bert_jax.defaults import ConfigError
from bert_jax.tasks import adapters
from bert_jax.tasks import glue

Array = jax.Array

PLACEHOLDERS = ("text_a", "text_b", "mask", "sep")
HEADS = ("mlm", "cls")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Marks the mask slots while special tokens are laid out (no vocabulary id is negative).
_MASK_SLOT = -1


# ------------------------------------------------------------------ patterns


@dataclasses.dataclass(frozen=True)
class Pattern:
  """A parsed pattern: per segment, its parts ('text_a', 'text_b', 'mask' or literal text).

  Attributes:
    segments: one or two tuples of parts, each part ('lit', text) or
      ('field', name) or ('mask', '').
  """
  segments: tuple[tuple[tuple[str, str], ...], ...]

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(v for seg in self.segments for k, v in seg if k == "field")


def parse_pattern(pattern: str, *, is_pair: bool, key: str = "cloze.pattern") -> Pattern:
  """The Pattern of `pattern`; a bad one is a one-line ConfigError naming `key`."""
  names = _PLACEHOLDER.findall(pattern)
  for name in names:
    if name not in PLACEHOLDERS:
      raise ConfigError(key, f"unknown placeholder {{{name}}} in {pattern!r}; use "
                        f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
  for name, want in (("mask", 1), ("text_a", 1), ("text_b", 1 if is_pair else 0)):
    if names.count(name) != want:
      raise ConfigError(key, f"{pattern!r} has {{{name}}} {names.count(name)} times; "
                        f"{'a pair' if is_pair else 'a single-sentence'} task needs {want}")
  if names.count("sep") > 1:
    raise ConfigError(key, f"{pattern!r} has {{sep}} {names.count('sep')} times; at most 1")
  segments, parts, last = [], [], 0
  for m in _PLACEHOLDER.finditer(pattern):
    if pattern[last:m.start()].strip():
      parts.append(("lit", pattern[last:m.start()].strip()))
    last = m.end()
    name = m.group(1)
    if name == "sep":
      segments.append(tuple(parts))
      parts = []
    else:
      parts.append(("mask", "") if name == "mask" else ("field", name))
  if pattern[last:].strip():
    parts.append(("lit", pattern[last:].strip()))
  segments.append(tuple(parts))
  if any(not seg for seg in segments):
    raise ConfigError(key, f"{pattern!r}: {{sep}} leaves an empty segment")
  return Pattern(tuple(segments))


def _cut_fields(lengths: dict, budget: int) -> dict:
  """How many tokens each text field keeps: the longest loses one at a time
  (original BERT's truncate_seq_pair; text_b first on ties)."""
  keep = dict(lengths)
  while sum(keep.values()) > budget:
    longest = max(keep.values())
    name = "text_b" if keep.get("text_b") == longest else "text_a"
    keep[name] -= 1
  return keep


def render(pattern: Pattern, fields: dict, literal_ids: dict, tokenizer, *, mask_id: int,
           num_masks: int, max_length: int) -> dict:
  """The features of one example: its pattern filled, special tokens added, cut to fit.

  Args:
    pattern: from parse_pattern.
    fields: 'text_a' (and 'text_b') -> token ids of the text.
    literal_ids: literal text -> its token ids.
    tokenizer: lays out the special tokens (`build_inputs`).
    mask_id: the [MASK] id.
    num_masks: how many masks {mask} stands for.
    max_length: tokens in all, special tokens included.

  Returns:
    'encoder_input_tokens', 'encoder_type_ids' int32 [length <= max_length]
    and 'mlm_positions' int32 [num_masks], where the masks are.
  """
  fixed = sum(len(literal_ids[v]) for seg in pattern.segments for k, v in seg if k == "lit")
  budget = (max_length - tokenizer.num_special_tokens(len(pattern.segments) == 2) - fixed
            - num_masks)
  if budget < len(pattern.fields):
    raise ConfigError("data.max_length", f"{max_length} leaves {budget} tokens for the text "
                      f"of the pattern (its own {fixed} tokens and {num_masks} mask(s) kept)")
  keep = _cut_fields({k: len(fields[k]) for k in pattern.fields}, budget)
  segments = []
  for seg in pattern.segments:
    ids = []
    for kind, value in seg:
      if kind == "lit":
        ids.append(literal_ids[value])
      elif kind == "field":
        ids.append(fields[value][:keep[value]])
      else:
        ids.append(np.full(num_masks, _MASK_SLOT))
    segments.append(np.concatenate([np.asarray(i, np.int32) for i in ids]))
  tokens, types = tokenizer.build_inputs(*segments)
  positions = np.flatnonzero(tokens == _MASK_SLOT).astype(np.int32)
  tokens = np.where(tokens == _MASK_SLOT, mask_id, tokens).astype(np.int32)
  return {"encoder_input_tokens": tokens, "encoder_type_ids": types.astype(np.int32),
          "mlm_positions": positions}


# --------------------------------------------------------------- verbalizers


@dataclasses.dataclass(frozen=True)
class Verbalizer:
  """Label -> words as token-id tables (numpy, constants of the jitted steps).

  Attributes:
    words: per label (task order), its words.
    ids: int32 [labels, words, masks]: token j of word w of label l (0 past its end).
    token_mask: float32 [labels, words, masks]: 1.0 where ids holds a token.
    word_mask: float32 [labels, words]: 1.0 where the label has word w.
  """
  words: tuple[tuple[str, ...], ...]
  ids: np.ndarray
  token_mask: np.ndarray
  word_mask: np.ndarray

  @property
  def num_masks(self) -> int:
    return self.ids.shape[2]


def parse_verbalizer(text: str, label_names: Sequence[str], *,
                     key: str = "cloze.verbalizer") -> tuple[tuple[str, ...], ...]:
  """'0=terrible,1=great|good' -> the words of each label in `label_names` order."""
  words = {}
  for entry in (e.strip() for e in text.split(",")):
    label, eq, value = entry.partition("=")
    label = label.strip()
    alternatives = tuple(w.strip() for w in value.split("|"))
    if not eq or not label or not all(alternatives):
      raise ConfigError(key, f"entry {entry!r} of {text!r} is not 'label=word' or "
                        "'label=word|word'")
    if label not in label_names:
      raise ConfigError(key, f"unknown label {label!r}; the task's labels are "
                        f"{list(label_names)}")
    if label in words:
      raise ConfigError(key, f"label {label!r} given twice in {text!r}")
    words[label] = alternatives
  missing = [n for n in label_names if n not in words]
  if missing:
    raise ConfigError(key, f"no word for label(s) {missing} in {text!r}")
  return tuple(words[n] for n in label_names)


def make_verbalizer(words: Sequence[Sequence[str]], tokenizer, *, single_token: bool,
                    key: str = "cloze.verbalizer") -> Verbalizer:
  """The id tables of `words`, each word tokenized; bad words are ConfigErrors naming `key`."""
  flat = [w for ws in words for w in ws]
  tokenized = dict(zip(flat, glue.token_ids(tokenizer, flat)))
  for w, ids in tokenized.items():
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    if len(ids) == 0:
      raise ConfigError(key, f"word {w!r} tokenizes to nothing in {tokenizer.path}")
    if tokenizer.unk_id is not None and tokenizer.unk_id in ids:
      raise ConfigError(key, f"word {w!r} is not in the vocabulary {tokenizer.path} "
                        f"(tokens {pieces})")
    if single_token and len(ids) != 1:
      raise ConfigError(key, f"word {w!r} is {len(ids)} tokens {pieces} in {tokenizer.path}, "
                        "not a single token (cloze.single_token=True)")
  masks = max(len(ids) for ids in tokenized.values())
  width = max(len(ws) for ws in words)
  ids = np.zeros((len(words), width, masks), np.int32)
  token_mask = np.zeros(ids.shape, np.float32)
  word_mask = np.zeros(ids.shape[:2], np.float32)
  for l, ws in enumerate(words):
    for w, word in enumerate(ws):
      t = tokenized[word]
      ids[l, w, :len(t)], token_mask[l, w, :len(t)], word_mask[l, w] = t, 1.0, 1.0
  return Verbalizer(tuple(tuple(ws) for ws in words), ids, token_mask, word_mask)


def label_scores(mlm_logits: Array, verbalizer: Verbalizer) -> Array:
  """[batch, masks, vocab] MLM logits at the masks -> [batch, labels] verbalizer scores.

  A word's score is the mean log-probability of its tokens (token j at mask
  j); a label's the mean of its words' scores. For one single-token word per
  label the softmax over these scores is PET's softmax over the verbalizer
  tokens' logits (log_softmax only subtracts the same normaliser from each).
  """
  logp = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), axis=-1)  # [batch, masks, vocab]
  slots = np.broadcast_to(np.arange(verbalizer.num_masks), verbalizer.ids.shape)
  per_token = logp[:, slots, verbalizer.ids]  # [batch, labels, words, masks]
  tokens = np.maximum(verbalizer.token_mask.sum(-1), 1.0)  # [labels, words]
  words = jnp.sum(per_token * verbalizer.token_mask, axis=-1) / tokens  # [batch, labels, words]
  return (jnp.sum(words * verbalizer.word_mask, axis=-1)
          / np.maximum(verbalizer.word_mask.sum(-1), 1.0))  # [batch, labels]


def cloze_loss(mlm_logits: Array, labels: Array, weights: Array, verbalizer: Verbalizer,
               prefix: str = "cloze") -> tuple[Array, dict]:
  """PET's loss: cross entropy of the softmax over the labels' verbalizer scores.

  Returns (weighted mean loss, summable metrics '<prefix>/loss_sum', '/count', '/correct').
  """
  # Filler rows carry label -1: any valid index will do under weight 0.
  return losses.classification_loss(label_scores(mlm_logits, verbalizer),
                                    jnp.maximum(labels, 0), weights, prefix=prefix)


def cloze_objective(verbalizer: Verbalizer) -> objectives.Objective:
  """The fine-tuning objective of a verbalizer (a record, not registered: its tables
  are this run's)."""
  def metrics(outputs, batch, *, prefix):
    return cloze_loss(outputs["mlm_logits"], batch["classifier_labels"],
                      objectives.classifier_weights(batch), verbalizer, prefix)[1]
  term = objectives.Term(
      "cloze", metrics, lambda batch: jnp.sum(objectives.classifier_weights(batch)),
      outputs=("mlm_logits",),
      features=("classifier_labels", "classifier_weights", "example_weights"))
  return objectives.Objective("cloze", "mlm", (term,))


# ------------------------------------------------------------------ few-shot


def few_shot_indices(labels: Sequence, label_names: Sequence[str], k: int, seed: int,
                     *, key: str = "cloze.k_per_class") -> np.ndarray:
  """Indices of k examples of each label, drawn without replacement, in example order.

  One numpy generator seeded with `seed` draws label after label (task
  order), so the subset depends on (labels, k, seed) alone.
  """
  labels = np.asarray(labels, dtype=object)
  rng = np.random.default_rng(seed)
  chosen = []
  for name in label_names:
    pool = np.flatnonzero(labels == name)
    if len(pool) < k:
      raise ConfigError(key, f"label {name!r} has {len(pool)} training examples, fewer than "
                        f"{k}")
    chosen.append(rng.choice(pool, size=k, replace=False))
  return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------- task


class ClozeTask(adapters.GlueTask):
  """A GLUE classification task as PET's cloze (head 'mlm') or, on the same
  few-shot subset, with the [CLS] classifier (head 'cls')."""

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if "cloze" not in config:
      raise ConfigError("cloze", "missing: task 'cloze' reads the cloze section "
                        "(pattern, verbalizer, ...); start from configs/pet.py")
    c = config.cloze
    if c.head not in HEADS:
      raise ConfigError("cloze.head", f"unknown head {c.head!r}; choose one of {list(HEADS)}")
    if self.task.is_regression:
      raise ConfigError("glue_task", f"{self.task.name} is a regression task: no labels to "
                        "verbalize")
    if c.k_per_class < 0:
      raise ConfigError("cloze.k_per_class", f"must be >= 0 (0 = every example), got "
                        f"{c.k_per_class}")
    self.head = c.head
    self.pattern = parse_pattern(c.pattern, is_pair=self.task.is_pair)
    self.verbalizer = make_verbalizer(parse_verbalizer(c.verbalizer, self.task.label_names),
                                      tokenizer, single_token=c.single_token)
    self.mask_id = tokenizer.require_mask_token()
    literals = sorted({v for seg in self.pattern.segments for k, v in seg if k == "lit"})
    self.literal_ids = dict(zip(literals, glue.token_ids(tokenizer, literals)))
    self.sample_seed = config.seed if c.sample_seed < 0 else c.sample_seed
    if self.head == "mlm":
      self.model_task, self.objective = "mlm", cloze_objective(self.verbalizer)

  @property
  def uses_mlm_head(self) -> bool:
    """finetune_init keeps init_from's MLM head (and requires one) for the cloze head."""
    return self.head == "mlm"

  @property
  def model_kwargs(self) -> dict:
    return {} if self.head == "mlm" else {"num_labels": self.num_labels}

  def _read(self, split: str) -> list:
    c = self.config.data
    if c.glue_source == "tfds":
      return glue.read_tfds(self.task, split, c.data_dir)
    return glue.read_tsv(c.data_dir, self.task, split)

  def encode(self, examples: Sequence[glue.GlueExample]) -> list:
    """The cloze features of `examples` (head 'cls': the [CLS] features)."""
    max_length = self.config.data.max_length
    if self.head == "cls":
      return glue.encode_examples(examples, self.tokenizer, self.task, max_length=max_length)
    texts = {"text_a": glue.token_ids(self.tokenizer, [e.text_a for e in examples])}
    if self.task.is_pair:
      texts["text_b"] = glue.token_ids(self.tokenizer, [e.text_b or "" for e in examples])
    features = []
    for i, ex in enumerate(examples):
      f = render(self.pattern, {k: v[i] for k, v in texts.items()}, self.literal_ids,
                 self.tokenizer, mask_id=self.mask_id, num_masks=self.verbalizer.num_masks,
                 max_length=max_length)
      f["classifier_labels"] = glue.label_id(self.task, ex.label)
      features.append(f)
    return features

  def load(self, split: str, limit: int) -> adapters.Split:
    examples = self._read(split)
    examples = examples[:limit] if limit > 0 else examples
    k = self.config.cloze.k_per_class
    if split == self.config.data.train_split and k > 0:
      keep = few_shot_indices([e.label for e in examples], self.task.label_names, k,
                              self.sample_seed)
      examples = [examples[i] for i in keep]
    return adapters.Split(split, examples, self.encode(examples))

  def pad(self, features: list, batch_size: int) -> dict:
    """The padded batch; `mlm_positions` [batch, masks] (filler rows: 0)."""
    if self.head == "cls":
      return super().pad(features, batch_size)
    batch = super().pad([{k: v for k, v in f.items() if k != "mlm_positions"}
                         for f in features], batch_size)
    positions = np.zeros((batch_size, self.verbalizer.num_masks), np.int32)
    positions[:len(features)] = [f["mlm_positions"] for f in features]
    batch["mlm_positions"] = positions
    return batch

  def predict_outputs(self, outputs: dict, batch: dict) -> dict:
    """{'logits': [batch, labels]}: the verbalizer scores (head 'mlm') or the classifier's."""
    del batch
    if self.head == "cls":
      return outputs
    return {"logits": label_scores(outputs["mlm_logits"], self.verbalizer)}
