"""Sentence embeddings: `bert-jax embed` (Sentence-BERT, Reimers & Gurevych 2019).

    bert-jax embed --init_from=FOLDER_OR_WORKDIR --input=sentences.txt --out=emb.npy \
        [--pooling=mean|cls|max|...] [--batch_size=64] [--max_length=0] [--text_field=NAME]

A checkpoint (a Hugging Face or sentence-transformers folder, a `bert-jax
train` workdir, or a `bert-jax finetune` workdir of the sentence-embedding task
(tasks/sentence.py: its best/ encoder, pooling and max_length)) encodes every
sentence; its last hidden states are pooled
(models/pooling.py) into one float32 vector per sentence, written as an
[N, hidden] .npy in input order.

Where the pooling comes from: `--pooling` when given; else a
sentence-transformers folder's modules.json / 1_Pooling/config.json (and its
Normalize module); else mean pooling, SBERT's default. The token budget: a
given `--max_length`, else sentence_bert_config.json's `max_seq_length`, else
the model's positions. Longer sentences are truncated (as
sentence-transformers does), counting [CLS]/[SEP].

Input: a text file with one sentence per line (every line counts, an empty
one too, so row i is line i); a .tsv with a header row or a .jsonl file, whose
column/field `--text_field` names the sentence.

Sharding: the model runs data-parallel over every device (one mesh, the
parameters replicated or sharded as the data_parallel rules say). Sentences are
sorted by length and cut into batches of `batch_size` (a multiple of the
device count), each padded to its longest sentence rounded up to 8, so a few
shapes compile and little padding is computed; the embeddings return to input
order at the end. Every host reads the whole input and writes nothing but
process 0's `--out`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import init_from as init_from_lib
from bert_jax import metrics
from bert_jax import models
from bert_jax import sharding
from bert_jax import steps
from bert_jax.convert import from_pretrained
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.models import pooling as pooling_lib
from bert_jax.tasks import batching
from bert_jax.tasks import sentence

# Sentences tokenized per tf call: bounded memory, few Python round trips.
_TOKENIZE_CHUNK = 4096


@dataclasses.dataclass
class Embedder:
  """A loaded encoder, ready to embed sentences.

  Attributes:
    model: the bare encoder task model (returns hidden states first).
    params: its parameters, on `mesh`.
    tokenizer: the checkpoint's tokenizer.
    pooling: how token states become one vector.
    max_length: tokens per sentence at most, special tokens included.
    mesh: the data-parallel mesh the step runs on.
    step: jitted (params, batch) -> [batch, dim] float32 embeddings, replicated.
  """
  model: Any
  params: Any
  tokenizer: Any
  pooling: pooling_lib.PoolingConfig
  max_length: int
  mesh: Any
  step: Callable


# ---------------------------------------------------------------- loading


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _encoder_from_folder(folder: str, dtype: Any) -> tuple[Any, dict, Any]:
  """(encoder model, params, tokenizer) of a Hugging Face / sentence-transformers folder."""
  model, params = from_pretrained(folder, task="encoder", dtype=dtype)
  family = models.family_of(model)
  if family.encoder_decoder:
    raise ValueError(f"--init_from={folder}: a {family.name} checkpoint; embed needs an "
                     f"encoder (BERT family or ModernBERT)")
  # The tokenizer's casing is the folder's own (tokenizer_config.json), not a guess.
  lower_case = _read_json(os.path.join(folder, "tokenizer_config.json")).get("do_lower_case", True)
  return model, params, tokenizer_lib.load_tokenizer(folder, lower_case=bool(lower_case))


def _encoder_from_workdir(workdir: str, dtype: Any, mesh, rules) -> tuple[Any, dict, Any]:
  """(encoder model, params on mesh, tokenizer) of a `bert-jax train` workdir's latest step."""
  _, _, saved = init_from_lib.pretraining_config(workdir)
  family = models.get(saved.family)
  if family.encoder_decoder:
    raise ValueError(f"--init_from={workdir}: a {family.name} run; embed needs an encoder")
  # As for fine-tuning: an ELECTRA run embeds with its plain discriminator.
  pretrained = init_from_lib.restore_workdir(workdir, saved.family, dtype, mesh, rules,
                                             finetuning=True)
  if "encoder" not in pretrained.params:
    raise ValueError(f"--init_from={workdir}: the checkpoint has no 'encoder' parameters "
                     f"(it has {sorted(pretrained.params)})")
  params = {"encoder": pretrained.params["encoder"]}
  model = family.build(pretrained.config, "encoder")
  # An MLM-only pretraining run trained no pooler; the bare encoder then builds none.
  if getattr(model, "add_pooler", False) and "pooler" not in params["encoder"]:
    model = model.clone(add_pooler=False)
  tokenizer = tokenizer_lib.load_tokenizer(pretrained.tokenizer, lower_case=pretrained.lower_case)
  return model, params, tokenizer


def _max_length(folder: str, model: Any, requested: int) -> int:
  family = models.family_of(model)
  positions = family.positions(model.config)
  if requested:
    if requested < 3:  # [CLS] and [SEP] leave no room for a word below 3
      raise ValueError(f"--max_length={requested}: needs at least 3 tokens")
    if positions is not None and requested > positions:
      raise ValueError(f"--max_length={requested} > the model's {positions} positions")
    return requested
  saved = _read_json(os.path.join(folder, "sentence_bert_config.json")).get("max_seq_length")
  return int(saved or positions or 512)


def resolve_pooling(folder: str, requested: str | None) -> pooling_lib.PoolingConfig:
  """--pooling when given (normalize kept from the folder), else the folder's, else mean."""
  from_folder = pooling_lib.read_sentence_transformers(folder)
  if not requested:
    return from_folder or pooling_lib.PoolingConfig()
  try:
    return pooling_lib.PoolingConfig(pooling_lib.parse_modes(requested),
                                     normalize=bool(from_folder and from_folder.normalize))
  except ValueError as e:
    raise ValueError(f"--pooling={requested}: {e}") from None


def _param_shardings(model: Any, mesh, rules) -> Any:
  """NamedShardings of the model's parameters under `rules` (from their logical axis names)."""
  inputs = {name: jnp.zeros((1, 1), jnp.int32)
            for name in models.family_of(model).init_features}
  with nn.logical_axis_rules(()):  # a batch of 1 does not divide the mesh: no constraints
    boxed = jax.eval_shape(lambda rng: model.init(rng, **inputs)["params"],
                           jax.random.PRNGKey(0))
  return sharding.logical_to_sharding(boxed, mesh, rules)


def make_embed_step(model: Any, pooling: pooling_lib.PoolingConfig, mesh, rules,
                    param_shardings: Any) -> Callable:
  """jit of (params, batch) -> pooled [batch, dim] float32, replicated on every device.

  `batch` holds `encoder_input_tokens` and `encoder_mask` [batch, length],
  split over the mesh's data axes.
  """
  def apply(params, batch):
    out = model.apply({"params": params}, **steps.model_inputs(model, batch))
    hidden = out[0] if isinstance(out, tuple) else out  # [batch, length, hidden]
    return pooling_lib.pool(hidden, batch["encoder_mask"], pooling)
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(steps.in_context(apply, mesh, rules),
                 in_shardings=(param_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()))


def load(init_from: str, *, pooling: str | None = None, max_length: int = 0,
         dtype: Any = jnp.float32, mesh=None, rules_preset: str = "data_parallel") -> Embedder:
  """The encoder of `init_from`, on `mesh`, with its pooling.

  Args:
    init_from: a Hugging Face / sentence-transformers folder or a `bert-jax
      train` workdir.
    pooling: 'mean', 'cls', 'max', ... or several joined by ','; None: the
      folder's pooling (sentence-transformers) or mean.
    max_length: tokens per sentence at most (0: the folder's or the model's).
    dtype: computation dtype (parameters stay float32).
    mesh: default: every device on the data axis.
    rules_preset: the sharding rules (sharding.RULES).
  """
  if not os.path.isdir(init_from):
    raise FileNotFoundError(f"--init_from={init_from}: no such folder")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  rules = sharding.get_rules(rules_preset)
  if sentence.is_trained_workdir(init_from):
    return _load_trained(init_from, pooling, max_length, dtype, mesh, rules)
  if init_from_lib.is_pretraining_workdir(init_from):
    model, params, tokenizer = _encoder_from_workdir(init_from, dtype, mesh, rules)
  else:
    model, params, tokenizer = _encoder_from_folder(init_from, dtype)
  param_shardings = _param_shardings(model, mesh, rules)
  params = jax.device_put(params, param_shardings)
  config = resolve_pooling(init_from, pooling)
  return Embedder(model, params, tokenizer, config, _max_length(init_from, model, max_length),
                  mesh, make_embed_step(model, config, mesh, rules, param_shardings))


def _load_trained(workdir: str, pooling: str | None, max_length: int, dtype: Any, mesh,
                  rules) -> Embedder:
  """The best encoder of a `bert-jax finetune` sentence-embedding workdir (tasks/sentence.py).

  Its pooling and max_length are the run's (finetune.pooling, data.max_length)
  unless `pooling` / `max_length` are given.
  """
  model, params, tokenizer, trained_pooling, trained_length = sentence.restore_encoder(
      workdir, dtype, mesh, rules)
  config = trained_pooling
  if pooling:
    try:
      config = pooling_lib.PoolingConfig(pooling_lib.parse_modes(pooling))
    except ValueError as e:
      raise ValueError(f"--pooling={pooling}: {e}") from None
  param_shardings = _param_shardings(model, mesh, rules)
  params = jax.device_put(params, param_shardings)
  length = _max_length(workdir, model, max_length) if max_length else trained_length
  return Embedder(model, params, tokenizer, config, length, mesh,
                  make_embed_step(model, config, mesh, rules, param_shardings))


# ---------------------------------------------------------------- input


def read_sentences(path: str, text_field: str | None = None) -> list[str]:
  """The sentences of `path`: lines of a text file, a .tsv column or a .jsonl field.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file holds no sentence, or `text_field` is missing / unknown.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input={path}: no such file")
  with open(path, encoding="utf-8-sig") as f:  # utf-8-sig: a BOM is not text
    text = f.read()
  lines = text.splitlines()
  if path.endswith((".tsv", ".jsonl")) and not text_field:
    raise ValueError(f"--input={path}: a {os.path.splitext(path)[1]} file needs --text_field "
                     "(the column / field holding the sentence)")
  if path.endswith(".tsv"):
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0] if rows else []
    if text_field not in header:
      raise ValueError(f"--text_field={text_field}: no such column in {path} (it has {header})")
    column = header.index(text_field)
    sentences = [row[column] if column < len(row) else "" for row in rows[1:]]
  elif path.endswith(".jsonl"):
    sentences = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if text_field not in record:
        raise ValueError(f"--text_field={text_field}: line {number} of {path} has no such "
                         f"field (it has {sorted(record)})")
      sentences.append(str(record[text_field]))
  else:
    sentences = lines
  if not sentences:
    raise ValueError(f"--input={path}: the file holds no sentence")
  return sentences


def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[np.ndarray]:
  """[CLS] ids [SEP] of each sentence (int32), the ids cut to fit `max_length` tokens."""
  budget = max_length - tokenizer.num_special_tokens(False)
  out = []
  for start in range(0, len(sentences), _TOKENIZE_CHUNK):
    ids = tokenizer.tokenize(list(sentences[start:start + _TOKENIZE_CHUNK])).to_list()
    out.extend(tokenizer.build_inputs(np.asarray(row[:budget], np.int32))[0] for row in ids)
  return out


# ---------------------------------------------------------------- embedding


def embed_tokens(embedder: Embedder, tokens: Sequence[np.ndarray], batch_size: int,
                 progress: bool = False) -> np.ndarray:
  """float32 [len(tokens), dim] embeddings of token sequences, in their order."""
  devices = jax.device_count()
  if batch_size < 1 or batch_size % devices:
    raise ValueError(f"--batch_size={batch_size} must be a positive multiple of the "
                     f"{devices} devices")
  order = batching.bucket_batches([len(t) for t in tokens], batch_size)
  bar = metrics.ProgressBar(len(order), enabled=progress and jax.process_index() == 0,
                            stream=sys.stderr) if order else None
  out = None
  for done, indices in enumerate(order, 1):
    features = [{"encoder_input_tokens": tokens[i],
                 "encoder_segment_ids": np.ones(len(tokens[i]), np.int32)} for i in indices]
    padded = batching.pad_batch(features, batch_size=batch_size,
                                pad_id=embedder.tokenizer.pad_id)
    batch = {"encoder_input_tokens": padded["encoder_input_tokens"],
             "encoder_mask": padded["encoder_segment_ids"]}
    vectors = np.asarray(jax.device_get(embedder.step(
        embedder.params, batching.on_mesh(batch, sharding.batch_sharding(embedder.mesh)))))
    if out is None:
      out = np.zeros((len(tokens), vectors.shape[-1]), np.float32)
    out[indices] = vectors[:len(indices)]
    if bar is not None:
      bar.update(done)
  if bar is not None:
    bar.close()
  return out


def embed(embedder: Embedder, sentences: Sequence[str], batch_size: int = 64,
          progress: bool = False) -> np.ndarray:
  """float32 [len(sentences), dim] embeddings of `sentences`, in their order."""
  return embed_tokens(embedder, tokenize(embedder.tokenizer, sentences, embedder.max_length),
                      batch_size, progress)


def run(init_from: str | None, input_path: str | None, out: str | None, *,
        pooling: str | None = None, batch_size: int = 64, max_length: int = 0,
        text_field: str | None = None) -> np.ndarray:
  """The body of `bert-jax embed`: reads, embeds, writes `out` (process 0); returns the array."""
  for flag, value in (("--init_from", init_from), ("--input", input_path), ("--out", out)):
    if not value:
      raise ValueError(f"embed needs {flag}")
  if pooling is not None:  # a bad mode fails before the model loads
    try:
      pooling_lib.PoolingConfig(pooling_lib.parse_modes(pooling))
    except ValueError as e:
      raise ValueError(f"--pooling={pooling}: {e}") from None
  sentences = read_sentences(input_path, text_field)
  embedder = load(init_from, pooling=pooling, max_length=max_length)
  logging.info("embed: %d sentences, pooling %s%s, max_length %d", len(sentences),
               "+".join(embedder.pooling.modes),
               " normalized" if embedder.pooling.normalize else "", embedder.max_length)
  vectors = embed(embedder, sentences, batch_size, progress=True)
  if jax.process_index() == 0:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    np.save(out, vectors)
    print(f"wrote {out}: {vectors.shape[0]} x {vectors.shape[1]} float32")
  return vectors
