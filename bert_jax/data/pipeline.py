"""Pretraining input pipeline: source -> tokens -> objective -> padded, sharded batches.

Deterministic and exactly resumable (DESIGN.md, Data). Structure:

  * Data shards. A source stored in at least num_shards files is split by
    whole FILES ("file mode"): file j goes to data shard j % num_shards, and
    a host opens only the files of its shards. That holds for a text source
    (path/glob; files sorted by name) and for a tfds split (its stored shard
    files in tfds's order, read through tfds.ReadConfig's per-file
    input_context; see sources.TextSource.documents). Otherwise (fewer files,
    a single text file, builtin) document i of the source goes to data shard
    i % num_shards and every host reads the whole source ("document mode",
    logged once with how to avoid it). Either map ignores the host count.
    Each shard is an independent tf.data pipeline. Global batch b is the
    concatenation, in shard order, of every shard's batch b of
    batch_size / num_shards examples. Host p of P runs only the contiguous
    shards [p*S/P, (p+1)*S/P), so the hosts' local batches concatenated in
    host order are exactly the single-host global batch.
  * Per shard and epoch: the shard's documents are shuffled by a stateless
    block shuffle (each block of `shuffle_buffer` consecutive documents is
    permuted with a seed from (seed, epoch, shard, block); it moves documents
    as locally as a tf.data shuffle buffer would, but needs no global seed and
    can start at any block). The shuffled documents are cut into groups of
    `group_size`; group g holds epoch documents [g*group_size, (g+1)*group_size).
    Each group is tokenized and cut into raw examples on its own (see
    bert_jax.data.examples), in a deterministic parallel map, then unbatched;
    every example carries its provenance (epoch, g, k = index within group).
  * Per example: seed = masking.example_seed(seed, epoch, index) with
    index = (g * num_shards + shard) * 2**24 + k (unique per epoch while a
    group makes < 2**24 examples), then the objective and padding to the
    batch contract. Epochs repeat forever with new shuffles and new masks.
  * Masking (every scheme: token, whole_word, span, ngram) runs after
    batching instead: each shard's padded batch is masked at once by
    batch_masking.mask_tokens_batch, every row keyed by its own example seed
    (so a row's mask does not depend on its batch neighbours and resume
    stays exact). For objective 'mlm' the seeds and the padding are computed
    in the group map too, so no per-example map runs at all.

Position: what the trainer saves in its checkpoint (see bert_jax/data/position.py).

Every data shard must yield examples: an epoch (begun at its first group)
of a shard whose documents all make none (e.g. only one-token documents with
mlm_nsp) raises a ValueError naming the shard, source and objective from
next(), instead of looping over empty epochs forever.
In document mode each shard reads the whole source and keeps its share
(ds.shard), so reading (not tokenizing) is repeated once per data shard a host
runs; file mode reads each file once. A shard's document index (shuffle
blocks, groups, resume) counts within its own document stream (in file mode:
its files' documents, file after file); the mode follows from the source and
num_shards alone and is saved in the position, so a position resumes only the
stream it came from (a source that gained or lost files so that its mode
changed is an error, not a silently different stream).
"""
import dataclasses
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from bert_jax.host_tf import tf

from bert_jax.data import batch_masking
from bert_jax.data import denoising
from bert_jax.data import examples as examples_lib
from bert_jax.data import masking
from bert_jax.data import position as position_lib
from bert_jax.data import sources
from bert_jax.data import span_corruption as span_lib
from bert_jax.data import tokenizer as tokenizer_lib

OBJECTIVES = ("mlm", "mlm_nsp", "mlm_sop", "span_corruption", "denoising")
_SEQ2SEQ = ("span_corruption", "denoising")  # rows of inputs + targets, not masked
# Counters of TrainIterator.stats (besides the source's invalid_utf8_bytes).
STATS = ("overlong_paragraphs", "skipped_one_token_documents")
_K_BITS = 24  # examples per group < 2**24 (index layout of the example seed)
_PROVENANCE = ("_epoch", "_group", "_k")
# Salts keeping the shuffle and group draws apart from the per-example seeds
# (example indices are >= 0; these are negative).
_SHUFFLE_SALT = -1
_GROUP_SALT = -(1 << 40)
# The eval stream uses another seed, so held-out masks never equal training ones.
_EVAL_SEED_OFFSET = 0x5EED
_EMPTY_EPOCH = "empty data shard"
_LOGGED_WHOLE_SOURCE = set()  # sources whose data shard mode was logged


@dataclasses.dataclass
class _Plan:
  """A validated config with its tokenizer, source and derived lengths."""
  cfg: Any
  seed: int
  tokenizer: Any
  vocab: Optional[masking.VocabInfo]
  source: sources.TextSource
  documents: Optional[tf.data.Dataset] = None  # document mode: built once, used by every shard
  shard_files: Optional[List[List[str]]] = None  # file mode: the files of each data shard
  tfds_file_mode: bool = False  # file mode of a tfds split (source.documents(file_shard=...))
  tokens_length: int = 0  # span corruption raw chunk length
  targets_length: int = 0  # span corruption decoder length
  chunk_length: int = 0  # ids per raw example chunk (over-long paragraph threshold)
  stats: Dict[str, tf.Variable] = dataclasses.field(default_factory=dict)


def _check(ok: bool, message: str):
  if not ok:
    raise ValueError(message)


def _validate(cfg, seed: int, shards: Sequence[int]) -> _Plan:
  """Checks the config against the objective's needs; opens tokenizer and source.

  `shards` are the data shards this host runs: in file mode only their files
  are opened.
  """
  _check(cfg.objective in OBJECTIVES,
         f"data.objective={cfg.objective!r} is unknown; choose one of {OBJECTIVES}")
  _check(cfg.masking in masking.MASKING_SCHEMES,
         f"data.masking={cfg.masking!r} is unknown; choose one of {masking.MASKING_SCHEMES}")
  for key in ("group_size", "num_shards", "shuffle_buffer", "max_predictions"):
    _check(cfg[key] >= 1, f"data.{key}={cfg[key]} must be >= 1")
  _check(0 < cfg.mask_rate <= 1, f"data.mask_rate={cfg.mask_rate} must be in (0, 1]")
  _check(not cfg.pack or cfg.objective == "mlm",
         f"data.pack=True packs objective 'mlm' rows; data.objective={cfg.objective!r} "
         "does not pack")
  _check(0 <= cfg.short_seq_prob <= 1,
         f"data.short_seq_prob={cfg.short_seq_prob} must be in [0, 1]")
  _check(bool(cfg.tokenizer), "data.tokenizer is empty: give a vocab.txt or a .model path")
  tok = tokenizer_lib.load_tokenizer(cfg.tokenizer, lower_case=cfg.lower_case,
                                     extra_ids=cfg.extra_ids)
  plan = _Plan(cfg, int(seed), tok, None, None)
  if cfg.objective == "span_corruption":
    _check(cfg.seq_length >= 4, f"data.seq_length={cfg.seq_length} is too small for "
           "span_corruption (need >= 4)")
    _check(tok.eos_id is not None, f"data.objective='span_corruption' needs an EOS id but "
           f"the vocabulary {tok.path} has none (use a T5-style SentencePiece model)")
    plan.tokens_length, plan.targets_length = span_lib.compute_input_and_target_lengths(
        cfg.seq_length, cfg.noise_density, cfg.mean_noise_span_length)
    try:
      span_lib.check_sentinel_budget(plan.tokens_length, tok.num_extra_ids,
                                     cfg.noise_density, cfg.mean_noise_span_length)
    except ValueError as e:
      raise ValueError(f"data.extra_ids={cfg.extra_ids}, data.seq_length={cfg.seq_length} "
                       f"with vocabulary {tok.path}: {e}") from e
  elif cfg.objective == "denoising":
    _check(cfg.seq_length >= 3, f"data.seq_length={cfg.seq_length} is too small for "
           "denoising (need >= 3: BOS, a token, EOS)")
    tok.require_mask_token()
    plan.vocab = masking.VocabInfo.from_tokenizer(tok)
    denoising.options_from_config(cfg)  # fails fast on a bad rate
  else:
    least = 3 if cfg.objective == "mlm" else 5  # [CLS] x [SEP] / [CLS] a [SEP] b [SEP]
    _check(cfg.seq_length >= least, f"data.seq_length={cfg.seq_length} is too small for "
           f"data.objective={cfg.objective!r} (need >= {least})")
    tok.require_mask_token()
    plan.vocab = masking.VocabInfo.from_tokenizer(tok)
  plan.chunk_length = {"mlm": cfg.seq_length - 2, "denoising": cfg.seq_length - 2,
                       "span_corruption": plan.tokens_length}.get(
      cfg.objective, cfg.seq_length - 3)
  plan.stats = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=k) for k in STATS}
  _open_documents(plan, shards)
  return plan


def _open_documents(plan: _Plan, shards: Sequence[int]):
  """Opens the source: whole files per data shard if it has enough, else documents.

  A source's own errors (missing file, empty corpus) name the key they came
  from: 'config.data.source: text file x.txt is empty'.
  """
  try:
    _open_source(plan, shards)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"config.data.source: {e}") from e


def _open_source(plan: _Plan, shards: Sequence[int]):
  cfg = plan.cfg
  files = sources.list_files(cfg.source)
  if files is not None and len(files) >= cfg.num_shards:
    # File mode: file j -> shard j % num_shards. Every file has a document
    # (open_source checks), so no shard is empty.
    plan.shard_files = [files[s::cfg.num_shards] for s in range(cfg.num_shards)]
    plan.source = sources.open_source(
        cfg.source, files=[f for s in shards for f in plan.shard_files[s]])
    return
  # Only metadata is read here (a tfds split's dataset_info.json).
  plan.source = sources.open_source(cfg.source, data_dir=cfg.data_dir or None,
                                    split=cfg.split)
  if plan.source.tfds_files is not None and plan.source.num_files >= cfg.num_shards:
    # tfds writes no empty shard file, so every data shard has examples (one
    # whose texts are all blank fails at its first epoch's end, _check_not_empty).
    plan.tfds_file_mode = True
    _log_once(cfg.source, "data.source=%r: the tfds split is stored in %d files; data shard "
              "s reads only files j with j %% %d == s, so each host reads only its "
              "shards' files", cfg.source, plan.source.num_files, cfg.num_shards)
    return
  if cfg.num_shards > 1:
    _log_once(cfg.source, "data.source=%r %s: documents are assigned to data shards one "
              "by one (document mode), so every host reads the whole source and each of "
              "its data shards reads it again. %s", cfg.source, *_document_mode_reason(plan))
  # A shard without documents would make its pipeline loop forever on empty
  # epochs; reading num_shards documents finds that (and an empty source) now.
  plan.documents = plan.source.documents()
  found = sum(1 for _ in plan.documents.take(cfg.num_shards))
  _check(found > 0, f"data.source={cfg.source!r} has no documents")
  _check(found == cfg.num_shards,
         f"data.source={cfg.source!r} has only {found} documents, fewer than "
         f"data.num_shards={cfg.num_shards}: some data shards would be empty")


def _document_mode_reason(plan: _Plan):
  """(why the source is in document mode, how to avoid it) for the log."""
  source, n = plan.source, plan.cfg.num_shards
  if source.tfds_files is not None:
    return (f"is a tfds split stored in {source.num_files} file(s), fewer than "
            f"data.num_shards={n}",
            f"To read by files, prepare the split with at least {n} shard files (e.g. "
            f"`tfds build ... --num_shards={n}`) or lower data.num_shards.")
  if source.files is not None:
    return (f"has {source.num_files} text file(s), fewer than data.num_shards={n}",
            f"To read by files, split the text into at least {n} files (whole documents "
            "per file; they are assigned in name order) or lower data.num_shards.")
  return ("is a builtin corpus (held in memory), which has no files to divide",
          "That is cheap for these small corpora; use a file or tfds source for large data.")


def _log_once(source: str, message: str, *args):
  if source not in _LOGGED_WHOLE_SOURCE:
    _LOGGED_WHOLE_SOURCE.add(source)
    logging.info(message, *args)


def _shuffled_documents(plan: _Plan, docs: tf.data.Dataset, epoch, shard,
                        start_doc) -> tf.data.Dataset:
  """The shard's documents of one epoch in shuffled order, from document `start_doc`."""
  cfg = plan.cfg
  if not cfg.shuffle:
    return docs.skip(start_doc)
  block = cfg.shuffle_buffer
  first_block = start_doc // block
  base = masking.example_seed(plan.seed, epoch, _SHUFFLE_SALT - shard)

  def permute(b, rows):
    seed = tf.random.experimental.stateless_fold_in(base, b)
    order = tf.argsort(tf.random.stateless_uniform([rows.nrows()], seed))
    return tf.gather(rows, order)

  blocks = docs.skip(first_block * block).ragged_batch(block)
  return (blocks.enumerate(start=first_block).map(_no_autograph(permute)).unbatch()
          .skip(start_doc - first_block * block))


def _no_autograph(fn):
  # These functions have no tensor-dependent Python control flow; skipping
  # AutoGraph's source conversion saves seconds of tracing per iterator.
  return tf.autograph.experimental.do_not_convert(fn)


def _batch_masked(cfg) -> bool:
  """Whether batches get MLM masks (batch_masking handles every masking scheme)."""
  return cfg.objective not in _SEQ2SEQ


def _group_examples(plan: _Plan, g, docs: tf.RaggedTensor, epoch, shard):
  """One group of raw documents -> dict of [C, ...] raw examples with provenance.

  For objective 'mlm' the examples come out final but unmasked:
  encoder_input_tokens padded to [C, seq_length] and `_seed` [C, 2].
  """
  cfg, tok = plan.cfg, plan.tokenizer
  if cfg.objective in ("mlm_nsp", "mlm_sop"):  # pairs of whole paragraphs
    doc_paragraphs = examples_lib.tokenize_paragraphs(tok, docs)  # [G, (paragraphs), (ids)]
    doc_ids = doc_paragraphs.merge_dims(1, 2)  # [G, (ids)], for the statistics
    para_lengths = doc_paragraphs.values.row_lengths()  # [P]
  else:
    doc_ids, para_lengths = examples_lib.tokenize_documents(
        tok, docs, return_paragraph_lengths=True)  # [G', (ids)], [P]
  counts = [plan.stats["overlong_paragraphs"].assign_add(
      tf.math.count_nonzero(para_lengths > plan.chunk_length))]
  if cfg.objective in ("mlm_nsp", "mlm_sop"):  # chunks of < 2 ids make no example
    counts.append(plan.stats["skipped_one_token_documents"].assign_add(
        tf.math.count_nonzero(tf.equal(doc_ids.row_lengths(), 1))))
  if cfg.objective == "mlm" and cfg.pack:
    rows = examples_lib.packed_mlm_rows(doc_ids, cfg.seq_length, tok.cls_id, tok.sep_id)
    out = dict(tokens=rows["tokens"], encoder_segment_ids=rows["segment_ids"],
               encoder_positions=rows["positions"],
               encoder_type_ids=tf.zeros_like(rows["tokens"]))
  elif cfg.objective == "mlm":
    chunks = examples_lib.mlm_examples(doc_ids, cfg.seq_length, tok.cls_id, tok.sep_id)
    out = dict(tokens=chunks.to_tensor(shape=[None, cfg.seq_length]))  # pad id 0
  elif cfg.objective == "span_corruption":
    out = dict(tokens=examples_lib.t5_examples(doc_ids, plan.tokens_length))
  elif cfg.objective == "denoising":  # within documents: sentences permute inside one
    out = dict(tokens=examples_lib.document_chunks(doc_ids, plan.chunk_length, min_tokens=1)[0])
  else:
    seed = masking.example_seed(plan.seed, epoch, _GROUP_SALT - (g * cfg.num_shards + shard))
    out = examples_lib.pair_examples(doc_paragraphs, cfg.seq_length, seed,
                                     short_seq_prob=cfg.short_seq_prob,
                                     random_next=cfg.objective == "mlm_nsp")
  tokens = out.get("tokens", out.get("tokens_a"))
  c = (tokens.nrows() if isinstance(tokens, tf.RaggedTensor)
       else tf.shape(tokens, out_type=tf.int64)[0])
  # The example seed index reserves _K_BITS bits for k (see module docstring).
  check = tf.debugging.assert_less(
      c, tf.constant(1 << _K_BITS, c.dtype),
      message=f"a group of data.group_size={cfg.group_size} documents made >= 2**{_K_BITS} "
      "examples; lower data.group_size")
  with tf.control_dependencies([check] + counts):
    c = tf.identity(c)
  out["_epoch"] = tf.fill([c], tf.cast(epoch, tf.int64))
  out["_group"] = tf.fill([c], tf.cast(g, tf.int64))
  out["_k"] = tf.range(c, dtype=tf.int64)
  if cfg.objective == "mlm":
    index = (tf.cast(g, tf.int64) * cfg.num_shards + shard) * (1 << _K_BITS) + out["_k"]
    out["_seed"] = batch_masking.example_seeds(plan.seed, epoch, index)
    out["encoder_input_tokens"] = out.pop("tokens")
  return out


def _example_features(plan: _Plan, ex, shard):
  """Objective + padding of one raw example; provenance passes through."""
  cfg = plan.cfg
  index = (ex["_group"] * cfg.num_shards + shard) * (1 << _K_BITS) + ex["_k"]
  seed = masking.example_seed(plan.seed, ex["_epoch"], index)
  raw = {k: (tf.ensure_shape(v, [None]) if k in ("tokens", "tokens_a", "tokens_b") else v)
         for k, v in ex.items() if not k.startswith("_")}
  out = examples_lib.apply_objective(raw, seed, objective=cfg.objective, cfg=cfg,
                                     vocab=plan.vocab, tokenizer=plan.tokenizer)
  out.update({k: ex[k] for k in _PROVENANCE})
  if _batch_masked(cfg):
    out["_seed"] = seed
  if cfg.objective == "span_corruption":
    return span_lib.pad_seq2seq_example(out, cfg.seq_length, plan.targets_length)
  if cfg.objective == "denoising":  # BOS chunk EOS fits seq_length; inserts may be cut
    return span_lib.pad_seq2seq_example(out, cfg.seq_length, cfg.seq_length)
  return masking.pad_mlm_example(out, cfg.seq_length)


def _epoch_examples(plan: _Plan, shard, epoch, start_group) -> tf.data.Dataset:
  """Padded examples of one epoch of one shard, from group `start_group` on."""
  cfg = plan.cfg
  # `shard` is a tensor here: one trace serves all shards.
  if plan.shard_files is not None:  # text files: look the shard's files up
    table = tf.ragged.constant(plan.shard_files, dtype=tf.string)
    docs = plan.source.documents(files=tf.gather(table, shard))
  elif plan.tfds_file_mode:
    docs = plan.source.documents(file_shard=(shard, cfg.num_shards))
  else:
    docs = plan.documents.shard(cfg.num_shards, shard)
  docs = _shuffled_documents(plan, docs, epoch, shard, start_group * cfg.group_size)
  groups = docs.ragged_batch(cfg.group_size).enumerate(start=start_group)
  ds = groups.map(_no_autograph(lambda g, d: _group_examples(plan, g, d, epoch, shard)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _check_not_empty(plan, ds, shard, epoch, start_group).unbatch()
  if cfg.objective == "mlm":
    return ds  # already padded, masked after batching
  ds = ds.map(_no_autograph(lambda ex: _example_features(plan, ex, shard)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds


def _empty_like(spec):
  """A value of `spec` (dense or ragged-rank-1, leading dimension free) with 0 rows."""
  if isinstance(spec, tf.RaggedTensorSpec):
    inner = [d or 0 for d in spec.shape[2:]]
    return tf.RaggedTensor.from_row_splits(tf.zeros([0] + inner, spec.dtype),
                                           tf.zeros([1], spec.row_splits_dtype))
  return tf.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype)


def _check_not_empty(plan: _Plan, groups: tf.data.Dataset, shard, epoch,
                     start_group) -> tf.data.Dataset:
  """Raises at the end of an epoch begun at group 0 whose groups made no example.

  Otherwise such a shard would loop over empty epochs forever (a silent hang).
  A marker element with 0 rows ends the epoch; a scan over the groups (not
  the examples) counts rows, so the check costs one add per group.
  """
  cfg = plan.cfg
  marker = tf.data.Dataset.from_tensors(
      (True, tf.nest.map_structure(_empty_like, groups.element_spec)))
  flagged = groups.map(lambda d: (False, d)).concatenate(marker)
  message = (f"{_EMPTY_EPOCH}: a whole epoch of a data shard made no example with "
             f"data.source={cfg.source!r} and data.objective={cfg.objective!r} (its "
             "documents are all too short, e.g. one-token documents under mlm_nsp/mlm_sop, "
             "whose chunks of < 2 ids are skipped); data shard, epoch:")

  def count(total, element):
    end, d = element
    total += tf.size(d["_k"], out_type=tf.int64)
    ok = tf.logical_or(tf.logical_not(end), tf.logical_or(total > 0, start_group > 0))
    check = tf.debugging.Assert(ok, [message, shard, epoch])
    with tf.control_dependencies([check]):
      return tf.identity(total), d

  return flagged.scan(tf.constant(0, tf.int64), _no_autograph(count))


def _mask_batch(plan: _Plan, batch):
  """Batched masking of one shard's padded batch (keyed by `_seed` per row)."""
  cfg = plan.cfg
  tokens = batch["encoder_input_tokens"]  # [batch, seq_length], unmasked
  out = dict(batch)
  out.update(batch_masking.mask_tokens_batch(
      tokens, out.pop("_seed"), plan.vocab, max_predictions=cfg.max_predictions,
      scheme=cfg.masking, rate=cfg.mask_rate, mask_prob=cfg.mask_prob, random_prob=cfg.random_prob))
  if "encoder_segment_ids" not in out:  # the 'mlm' rows skipped pad_mlm_example
    real = tf.not_equal(tokens, 0)
    out["encoder_type_ids"] = tf.zeros_like(tokens)
    out["encoder_segment_ids"] = tf.cast(real, tf.int32)
    out["encoder_positions"] = tf.where(real, tf.range(cfg.seq_length)[None, :], 0)
  return out


def _shard_stream(plan: _Plan, shard, epoch, group, offset, repeat_epoch: bool = False):
  """Endless example stream of one shard, resumed at (epoch, group, offset).

  All arguments may be tensors, so one trace serves every shard. With
  `repeat_epoch` the same epoch (same shuffle and masks) repeats forever.
  """
  epochs = (tf.data.Dataset.from_tensors(epoch).repeat() if repeat_epoch
            else tf.data.Dataset.range(epoch, 1 << 62))
  first = tf.cast(epoch, tf.int64)
  stream = epochs.flat_map(lambda e: _epoch_examples(
      plan, shard, e, tf.where(tf.equal(e, first), tf.cast(group, tf.int64), 0)))
  return stream.skip(offset)


def _host_batches(plan: _Plan, shards: List[int], start: Dict[int, tuple], per_shard: int,
                  repeat_epoch: bool = False) -> tf.data.Dataset:
  """Host-local batches: each shard's batch of per_shard examples, in shard order."""
  starts = np.array([start[s] for s in shards], np.int64).reshape(len(shards), 3)
  units = tf.data.Dataset.from_tensor_slices(
      (np.array(shards, np.int64), starts[:, 0], starts[:, 1], starts[:, 2]))
  # Round-robin over the shards (one batch each in turn): one trace of the
  # per-shard pipeline, whatever the number of shards.
  def shard_batches(s, e, g, o):
    ds = _shard_stream(plan, s, e, g, o, repeat_epoch).batch(per_shard, drop_remainder=True)
    if _batch_masked(plan.cfg):
      ds = ds.map(_no_autograph(lambda b: _mask_batch(plan, b)))
    return ds

  ds = units.interleave(
      shard_batches,
      cycle_length=len(shards), block_length=1, num_parallel_calls=len(shards),
      deterministic=True)
  ds = ds.batch(len(shards), drop_remainder=True)

  def merge(batch):  # [shards, per_shard, ...] -> [shards * per_shard, ...]
    return {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for k, v in batch.items()}

  ds = ds.map(merge).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def read_mode(plan: _Plan) -> str:
  """'files' (each data shard reads whole files) or 'documents' (see the module docstring)."""
  return "files" if plan.shard_files is not None or plan.tfds_file_mode else "documents"


def _host_shards(num_shards: int, batch_size: int, process_index: int,
                 process_count: int) -> List[int]:
  """The data shards host `process_index` runs; checks divisibility."""
  if batch_size % num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by "
                     f"data.num_shards={num_shards}")
  if process_count < 1 or num_shards % process_count:
    raise ValueError(f"data.num_shards={num_shards} is not divisible by "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  per_host = num_shards // process_count
  return list(range(process_index * per_host, (process_index + 1) * per_host))


def _numpy_batch(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return {k: v for k, v in batch.items() if not k.startswith("_")}


def _next_batch(it) -> Dict[str, np.ndarray]:
  """next(it), with the in-graph empty-shard assertion turned into a ValueError."""
  try:
    return next(it)
  except tf.errors.InvalidArgumentError as e:
    if _EMPTY_EPOCH not in e.message:
      raise
    line = next(l for l in e.message.splitlines() if _EMPTY_EPOCH in l)
    line = line[line.index(_EMPTY_EPOCH):].replace("\\'", "'").replace(":] [", ": [")
    raise ValueError(line) from None


def _eval_batches(it) -> Iterator[Dict[str, np.ndarray]]:
  while True:
    try:
      batch = _next_batch(it)
    except StopIteration:
      return
    yield _numpy_batch(batch)


class TrainIterator:
  """Endless iterator of host-local batches (dicts of numpy arrays).

  Attributes:
    position: the data position after the last batch returned (module
      docstring); save it in the checkpoint and pass it back to
      make_train_iterator to continue with exactly the next batch.
    shards: the data shards this host runs.
    tokenizer: the tokenizer in use.
    stats: dict of counts so far, for logs: `overlong_paragraphs` (paragraphs
      with more ids than one example's chunk, split across examples),
      `skipped_one_token_documents` (mlm_nsp / mlm_sop: documents of one id,
      which make no example) and the source's `invalid_utf8_bytes`. They
      count what the pipeline has processed, prefetching included, and every
      epoch counts again. Each is read on its own while prefetching runs, so
      one may already include a group of documents that another does not.
  """

  def __init__(self, plan: _Plan, shards: List[int], per_shard: int,
               start: Dict[int, tuple]):
    self.tokenizer = plan.tokenizer
    self.shards = shards
    self._per_shard = per_shard
    self._cfg = plan.cfg
    self._read_mode = read_mode(plan)
    self._next = dict(start)  # shard -> (epoch, group, offset)
    self._stats = dict(plan.stats, invalid_utf8_bytes=plan.source.invalid_utf8_bytes)
    self._it = _host_batches(plan, shards, start, per_shard).as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = _next_batch(self._it)
    for j, s in enumerate(self.shards):
      last = (j + 1) * self._per_shard - 1
      self._next[s] = (int(batch["_epoch"][last]), int(batch["_group"][last]),
                       int(batch["_k"][last]) + 1)
    return _numpy_batch(batch)

  @property
  def position(self) -> Dict[str, Any]:
    return position_lib.make_position(self._cfg, self._next, self._read_mode)

  @property
  def stats(self) -> Dict[str, int]:
    return {k: int(v.numpy()) for k, v in self._stats.items()}


def make_train_iterator(data_config, *, seed: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1,
                        position: Optional[Dict[str, Any]] = None) -> TrainIterator:
  """Endless, deterministic, resumable iterator of this host's training batches.

  Args:
    data_config: the `data` config (`defaults.data_config()`).
    seed: run seed (config.seed).
    batch_size: GLOBAL batch size (config.train.batch_size).
    process_index: this host (jax.process_index()).
    process_count: number of hosts (jax.process_count()).
    position: a position saved from TrainIterator.position (this host's or
      merged over hosts); None starts at the beginning.

  Returns:
    A TrainIterator; each batch holds batch_size / process_count examples in
    the batch-contract names (DESIGN.md).

  Raises:
    ValueError naming the config key / number on a bad config or position.
  """
  shards = _host_shards(data_config.num_shards, batch_size, process_index, process_count)
  plan = _validate(data_config, seed, shards)
  start = position_lib.start_of(data_config, position, shards, read_mode(plan))
  return TrainIterator(plan, shards, batch_size // data_config.num_shards, start)


def make_eval_iterator(data_config, *, seed: int, batch_size: int, num_batches: int,
                       process_index: int = 0,
                       process_count: int = 1) -> Iterator[Dict[str, np.ndarray]]:
  """A fixed, finite set of batches for held-out loss: identical on every call.

  Uses epoch 0 and the seed `seed + 0x5EED`, so its masks differ from the
  training stream's; a corpus with fewer examples than needed is repeated
  with the SAME masks (the epoch stays 0).

  Args:
    data_config: the `data` config of the held-out source.
    seed: run seed.
    batch_size: global batch size.
    num_batches: number of batches yielded.
    process_index: this host.
    process_count: number of hosts.

  Returns:
    Iterator of num_batches host-local batches (dicts of numpy arrays).
  """
  shards = _host_shards(data_config.num_shards, batch_size, process_index, process_count)
  plan = _validate(data_config, seed + _EVAL_SEED_OFFSET, shards)
  start = {s: (0, 0, 0) for s in shards}
  ds = _host_batches(plan, shards, start, batch_size // data_config.num_shards,
                     repeat_epoch=True).take(num_batches)
  return _eval_batches(ds.as_numpy_iterator())
