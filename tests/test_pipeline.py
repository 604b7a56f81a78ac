"""Tests of the pretraining pipeline: determinism, exact resume, hosts, batch contract."""
import json
import random
import shutil
import time

import numpy as np
import pytest

from bert_jax import defaults
from bert_jax.data import pipeline
from bert_jax.data import position as position_lib
from bert_jax.data import tokenizer as tokenizer_lib
from conftest import prepare_tfds

_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form sentence great think say help "
    "low line differ turn cause much mean before move right boy old too same tell does set "
    "three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need "
    "house picture try us again animal point mother world near build self earth father").split()


def _document(rng, words_per_doc):
  """A few paragraphs of random sentences, about `words_per_doc` words in all."""
  paras, left = [], words_per_doc
  while left > 0:
    n = min(left, rng.randint(8, 30))
    words = [rng.choice(_WORDS) for _ in range(n)]
    paras.append(" ".join(words).capitalize() + ".")
    left -= n
  return paras


def _write_corpus(path, docs):
  with open(path, "w") as f:
    f.write("\n\n".join("\n".join(d) for d in docs) + "\n")
  return str(path)


def _docs(seed, num_docs, lo=20, hi=60):
  rng = random.Random(seed)
  return [_document(rng, rng.randint(lo, hi)) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def corpus_docs():
  return _docs(0, 48)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_docs):
  return _write_corpus(tmp_path_factory.mktemp("corpus") / "docs.txt", corpus_docs)


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory, corpus):
  folder = tmp_path_factory.mktemp("spm")
  tok = tokenizer_lib.train_sentencepiece(corpus, str(folder / "t5"), vocab_size=120,
                                          extra_ids=100, seed=0, num_threads=1)
  return tok.path


def _config(tokenizer, source, **overrides):
  cfg = defaults.data_config()
  cfg.tokenizer = str(tokenizer)
  cfg.source = source
  cfg.seq_length = 32
  cfg.max_predictions = 6
  cfg.group_size = 2
  cfg.num_shards = 2
  cfg.shuffle_buffer = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _vocab(minilm_dir):
  return minilm_dir / "vocab.txt"


def _originals(batch):
  """Rows with the predicted tokens put back (the unmasked inputs)."""
  orig = batch["encoder_input_tokens"].copy()
  w = batch["mlm_weights"] > 0
  rows = np.broadcast_to(np.arange(len(orig))[:, None], w.shape)
  orig[rows[w], batch["mlm_positions"][w]] = batch["mlm_targets"][w]
  return orig


def test_determinism_and_dynamic_masks(minilm_dir, tmp_path):
  # 6 short documents, one per group: every epoch holds the same raw examples
  # (a document's chunks do not depend on the order), shuffled anew.
  source = _write_corpus(tmp_path / "small.txt", _docs(5, 6, 10, 30))
  cfg = _config(_vocab(minilm_dir), source, group_size=1, shuffle_buffer=3)
  first = pipeline.make_train_iterator(cfg, seed=3, batch_size=2)
  again = pipeline.make_train_iterator(cfg, seed=3, batch_size=2)
  other = pipeline.make_train_iterator(cfg, seed=4, batch_size=2)
  by_epoch = {0: {}, 1: {}}  # epoch -> {original row: masked row}
  differs = False
  for _ in range(40):
    a, b, c = next(first), next(again), next(other)
    _assert_same(a, b)
    differs |= not np.array_equal(a["encoder_input_tokens"], c["encoder_input_tokens"])
    # One example per shard and batch: the position names its epoch.
    for row, epoch in enumerate(first.position["epoch"]):
      if epoch in by_epoch:
        by_epoch[epoch][tuple(_originals(a)[row])] = tuple(a["encoder_input_tokens"][row])
  assert differs
  assert max(first.position["epoch"]) >= 2, first.position
  assert by_epoch[0].keys() == by_epoch[1].keys()
  changed = [by_epoch[0][k] != by_epoch[1][k] for k in by_epoch[0]]
  assert np.mean(changed) > 0.8


def _resume_config(objective, minilm_dir, t5_model, corpus):
  if objective == "span_corruption":
    # One document per group: SentencePiece pieces are short, so a group makes
    # many examples. shuffle_buffer == group_size (see below).
    return _config(t5_model, corpus, objective=objective, seq_length=64, group_size=1,
                   shuffle_buffer=1)
  if objective == "mlm_pack":
    return _config(_vocab(minilm_dir), corpus, objective="mlm", pack=True)
  return _config(_vocab(minilm_dir), corpus, objective=objective)


@pytest.mark.parametrize("objective", ["mlm", "mlm_nsp", "span_corruption", "denoising",
                                       "mlm_pack"])
def test_exact_resume_skips_raw_documents(objective, minilm_dir, t5_model, corpus,
                                          corpus_docs, tmp_path):
  cfg = _resume_config(objective, minilm_dir, t5_model, corpus)
  it = pipeline.make_train_iterator(cfg, seed=7, batch_size=4)
  batches = _take(it, 3)
  position = json.loads(json.dumps(it.position))  # what a checkpoint stores
  batches += _take(it, 4)
  assert min(position["group"]) >= 1, position  # else nothing would be skipped
  assert max(it.position["epoch"]) == 0  # the poisoned documents come back in epoch 1

  # The documents before each shard's resume group are replaced by other,
  # longer text (150 words, the originals have 20-60): if the resumed pipeline
  # tokenized them and skipped examples instead of raw documents, the examples
  # after them would shift. shuffle_buffer == group_size, so the skipped
  # documents are exactly the shard's first group * group_size documents.
  rng = random.Random(99)
  poisoned = []
  for i, doc in enumerate(corpus_docs):
    shard = i % cfg.num_shards
    skipped = i // cfg.num_shards < position["group"][shard] * cfg.group_size
    poisoned.append(_document(rng, 150) if skipped else doc)
  cfg.source = _write_corpus(tmp_path / "poisoned.txt", poisoned)
  resumed = pipeline.make_train_iterator(cfg, seed=7, batch_size=4, position=position)
  for want, got in zip(batches[3:], _take(resumed, 4)):
    _assert_same(want, got)
  assert resumed.position == it.position


def test_hosts_split_the_global_batch(minilm_dir, corpus):
  cfg = _config(_vocab(minilm_dir), corpus, objective="mlm_sop", num_shards=4)
  whole = pipeline.make_train_iterator(cfg, seed=1, batch_size=8)
  hosts = [pipeline.make_train_iterator(cfg, seed=1, batch_size=8, process_index=p,
                                        process_count=2) for p in range(2)]
  assert hosts[0].shards == [0, 1] and hosts[1].shards == [2, 3]
  labels = []
  for _ in range(3):
    g = next(whole)
    labels += g["nsp_labels"].tolist()  # SOP: 1 = swapped
    parts = [next(h) for h in hosts]
    assert parts[0]["encoder_input_tokens"].shape == (4, 32)
    _assert_same(g, {k: np.concatenate([p[k] for p in parts]) for k in g})
    rows = [set(map(tuple, p["encoder_input_tokens"])) for p in parts]
    assert not rows[0] & rows[1]
  assert set(labels) == {0, 1}
  # The hosts' positions, merged, are the single-host position (which resumes
  # exactly, test_exact_resume_skips_raw_documents).
  merged = position_lib.merge_positions([h.position for h in hosts])
  assert merged == whole.position


def test_mlm_batch_contract(minilm_dir, corpus, corpus_docs):
  # One shard, one group holding every document, no shuffle: the originals of
  # consecutive examples, joined, are the documents' ids separated by [SEP].
  cfg = _config(_vocab(minilm_dir), corpus, num_shards=1, group_size=64, shuffle=False,
                max_predictions=8)
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=4)
  tok = it.tokenizer
  stream = []
  for _ in range(5):
    b = next(it)
    assert b["encoder_input_tokens"].shape == (4, 32)
    assert b["mlm_positions"].shape == (4, 8)
    for k, v in b.items():
      assert v.dtype == (np.float32 if k == "mlm_weights" else np.int32), k
    tokens, w = b["encoder_input_tokens"], b["mlm_weights"]
    np.testing.assert_array_equal(b["encoder_segment_ids"], (tokens != 0).astype(np.int32))
    np.testing.assert_array_equal(b["mlm_positions"][w == 0], 0)
    np.testing.assert_array_equal(b["mlm_targets"][w == 0], 0)
    assert np.all(w.sum(1) == np.round(32 * 0.15))
    for row in range(4):
      orig = tokens[row].copy()
      p, t = b["mlm_positions"][row][w[row] > 0], b["mlm_targets"][row][w[row] > 0]
      assert not tok.special[t].any()
      # Unpredicted tokens never show [MASK]; predicted ones are mostly masked.
      others = np.ones(32, bool)
      others[p] = False
      assert not np.any(tokens[row][others] == tok.mask_id)
      orig[p] = t
      n = int((orig != 0).sum())
      assert orig[0] == tok.cls_id and orig[n - 1] == tok.sep_id
      stream += orig[1:n - 1].tolist()
  masked = [b["encoder_input_tokens"][r][b["mlm_positions"][r][b["mlm_weights"][r] > 0]]
            for r in range(4)]
  assert np.mean(np.concatenate(masked) == tok.mask_id) > 0.5
  want = []
  for doc in corpus_docs:
    want += [tok.sep_id] + np.concatenate(tok.tokenize(doc).numpy()).tolist()
  assert len(stream) > 4 * 30 * 4
  assert stream == want[1:len(stream) + 1]


def test_nsp_batch_contract(minilm_dir, corpus):
  cfg = _config(_vocab(minilm_dir), corpus, objective="mlm_nsp", masking="whole_word")
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=8)
  tok = it.tokenizer
  labels = []
  for _ in range(4):
    b = next(it)
    assert b["nsp_labels"].shape == (8,) and b["nsp_labels"].dtype == np.int32
    labels += b["nsp_labels"].tolist()
    for row in range(8):
      tokens, types = b["encoder_input_tokens"][row], b["encoder_type_ids"][row]
      n = int((tokens != 0).sum())
      assert np.all(tokens[n:] == 0) and tokens[0] == tok.cls_id
      seps = np.flatnonzero(tokens == tok.sep_id)
      assert len(seps) == 2 and seps[-1] == n - 1
      # Types: 0 through the first [SEP], 1 on B and its [SEP], 0 on padding.
      np.testing.assert_array_equal(types[:seps[0] + 1], 0)
      np.testing.assert_array_equal(types[seps[0] + 1:n], 1)
      np.testing.assert_array_equal(types[n:], 0)
  assert set(labels) == {0, 1}


def test_span_corruption_lengths(t5_model, corpus):
  cfg = _config(t5_model, corpus, objective="span_corruption", seq_length=512,
                num_shards=1, group_size=48)
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=2)
  b = next(it)
  assert b["encoder_input_tokens"].shape == (2, 512)
  assert b["decoder_target_tokens"].shape == (2, 114)
  assert b["decoder_loss_weights"].dtype == np.float32
  tok = it.tokenizer
  sentinel = tok.vocab_size - tok.num_extra_ids
  for row in range(2):
    inputs, targets = b["encoder_input_tokens"][row], b["decoder_target_tokens"][row]
    # A full chunk: 568 raw tokens split between inputs and targets, each
    # ending with one EOS; both rows fill their lengths exactly.
    raw = [x for x in np.concatenate([inputs, targets]) if 0 < x < sentinel and x != tok.eos_id]
    assert len(raw) == 568
    assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
    np.testing.assert_array_equal(b["decoder_input_tokens"][row][1:], targets[:-1])


def test_packed_mlm_rows_keep_documents_apart(minilm_dir, corpus, corpus_docs):
  cfg = _config(_vocab(minilm_dir), corpus, pack=True, seq_length=48, num_shards=1,
                group_size=48, shuffle=False, mask_rate=0.0001, max_predictions=1)
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=4)
  tok = it.tokenizer
  want = [list(tok.tokenize(" ".join(d)).numpy()) for d in corpus_docs]
  got, real, rows = [], 0, 0
  for b in _take(it, 6):
    orig = _originals(b)
    for row in range(4):
      seg, pos = b["encoder_segment_ids"][row], b["encoder_positions"][row]
      n = int((seg > 0).sum())
      assert (seg[:n] > 0).all() and (seg[n:] == 0).all()  # only the tail pads
      assert np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1
      for s in range(1, seg.max() + 1):
        ids = orig[row][seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(ids)))
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        got.append(list(ids[1:-1]))
      real, rows = real + n, rows + 1
  # In order and unshuffled, the examples are the documents cut in 46-id chunks.
  chunks = [d[i:i + 46] for d in want for i in range(0, len(d), 46)]
  assert got == chunks[:len(got)]
  assert rows < len(got)  # packed: some rows hold several examples
  bad = _config(_vocab(minilm_dir), corpus, pack=True, objective="mlm_sop")
  with pytest.raises(ValueError, match="data.pack"):
    pipeline.make_train_iterator(bad, seed=0, batch_size=4)


def test_denoising_rows(minilm_dir, corpus):
  # BART text infilling + sentence permutation: the targets are the chunk
  # itself (within one document), the inputs its noised form, both
  # [CLS] ... [SEP] (BOS ... EOS) on the batch contract.
  cfg = _config(_vocab(minilm_dir), corpus, objective="denoising", mask_rate=0.3)
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=4)
  tok = it.tokenizer
  masked = 0
  for b in _take(it, 3):
    assert b["encoder_input_tokens"].shape == b["decoder_target_tokens"].shape == (4, 32)
    for row in range(4):
      seg = b["encoder_segment_ids"][row] > 0
      inputs = b["encoder_input_tokens"][row][seg]
      targets = b["decoder_target_tokens"][row][b["decoder_segment_ids"][row] > 0]
      assert inputs[0] == targets[0] == tok.cls_id and targets[-1] == tok.sep_id
      assert inputs[-1] == tok.sep_id or len(inputs) == 32  # an overflow row is cut
      masked += int((inputs == tok.mask_id).sum())
      # Sentence permutation and infilling move and drop tokens, never invent
      # them (random replacements aside): most inputs are target tokens.
      assert np.isin(inputs, np.append(targets, tok.mask_id)).mean() > 0.8
      np.testing.assert_array_equal(b["decoder_input_tokens"][row][1:len(targets)],
                                    targets[:-1])
  assert masked > 0
  bad = _config(_vocab(minilm_dir), corpus, objective="denoising", rotate_ratio=2.0)
  with pytest.raises(ValueError, match="data.rotate_ratio"):
    pipeline.make_train_iterator(bad, seed=0, batch_size=4)


def test_eval_iterator_is_fixed_and_finite(minilm_dir, corpus):
  cfg = _config(_vocab(minilm_dir), corpus)
  one = list(pipeline.make_eval_iterator(cfg, seed=0, batch_size=4, num_batches=3))
  two = list(pipeline.make_eval_iterator(cfg, seed=0, batch_size=4, num_batches=3))
  assert len(one) == 3
  for a, b in zip(one, two):
    _assert_same(a, b)
  train = next(pipeline.make_train_iterator(cfg, seed=0, batch_size=4))
  assert not np.array_equal(train["encoder_input_tokens"], one[0]["encoder_input_tokens"])


def test_bad_input(minilm_dir, corpus, t5_model, tmp_path):
  vocab = _vocab(minilm_dir)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_train_iterator(_config(vocab, str(empty)), seed=0, batch_size=4)
  with pytest.raises(ValueError, match="data.objective='electra'"):
    pipeline.make_train_iterator(_config(vocab, corpus, objective="electra"), seed=0,
                                 batch_size=4)
  with pytest.raises(ValueError, match="data.masking='random'"):
    pipeline.make_train_iterator(_config(vocab, corpus, masking="random"), seed=0,
                                 batch_size=4)
  no_mask = tmp_path / "vocab.txt"
  no_mask.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + _WORDS) + "\n")
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    pipeline.make_train_iterator(_config(no_mask, corpus), seed=0, batch_size=4)
  with pytest.raises(ValueError, match="extra_ids=2"):
    pipeline.make_train_iterator(
        _config(t5_model, corpus, objective="span_corruption", seq_length=512, extra_ids=2),
        seed=0, batch_size=4)
  with pytest.raises(ValueError, match="EOS"):
    pipeline.make_train_iterator(_config(vocab, corpus, objective="span_corruption"),
                                 seed=0, batch_size=4)
  with pytest.raises(ValueError, match="seq_length=4"):
    pipeline.make_train_iterator(_config(vocab, corpus, objective="mlm_nsp", seq_length=4),
                                 seed=0, batch_size=4)
  with pytest.raises(ValueError, match="batch_size=5 .*num_shards=2"):
    pipeline.make_train_iterator(_config(vocab, corpus), seed=0, batch_size=5)
  with pytest.raises(ValueError, match="num_shards=2 .*process_count=3"):
    pipeline.make_train_iterator(_config(vocab, corpus), seed=0, batch_size=4,
                                 process_count=3)
  one_doc = _write_corpus(tmp_path / "one.txt", [["Just one document here."]])
  with pytest.raises(ValueError, match="fewer than data.num_shards=2"):
    pipeline.make_train_iterator(_config(vocab, one_doc), seed=0, batch_size=4)
  bad_position = {"num_shards": 4, "group_size": 2, "shard": [0], "epoch": [0], "group": [0],
                  "offset": [0]}
  with pytest.raises(ValueError, match="num_shards=4"):
    pipeline.make_train_iterator(_config(vocab, corpus), seed=0, batch_size=4,
                                 position=bad_position)
  # A position counts documents in its read mode: one file is dealt document by
  # document, two whole files to the two shards; a folder that gained the
  # second file cannot resume the first stream.
  folder = tmp_path / "grows"
  folder.mkdir()
  shutil.copy(corpus, folder / "a.txt")
  it = pipeline.make_train_iterator(_config(vocab, str(folder / "*.txt")), seed=0, batch_size=4)
  next(it)
  assert it.position["read_mode"] == "documents"
  shutil.copy(corpus, folder / "b.txt")
  with pytest.raises(ValueError, match="read in documents mode.*now read in files mode"):
    pipeline.make_train_iterator(_config(vocab, str(folder / "*.txt")), seed=0, batch_size=4,
                                 position=it.position)
  files = pipeline.make_train_iterator(_config(vocab, str(folder / "*.txt")), seed=0,
                                       batch_size=4)
  next(files)
  assert files.position["read_mode"] == "files"


@pytest.mark.parametrize("objective,scheme", [("mlm", "whole_word"), ("mlm_sop", "token")])
def test_batched_masks_do_not_depend_on_batch_size(objective, scheme, minilm_dir, corpus):
  # 'token' / 'whole_word' masking runs on whole batches; each row is keyed by
  # its own example seed, so the same example gets the same mask at any batch size.
  cfg = _config(_vocab(minilm_dir), corpus, objective=objective, masking=scheme,
                num_shards=1)
  small = pipeline.make_train_iterator(cfg, seed=2, batch_size=2)
  large = pipeline.make_train_iterator(cfg, seed=2, batch_size=6)
  a = [next(small) for _ in range(6)]
  b = [next(large) for _ in range(2)]
  for k in a[0]:
    np.testing.assert_array_equal(np.concatenate([x[k] for x in a]),
                                  np.concatenate([x[k] for x in b]), err_msg=k)
  w = np.concatenate([x["mlm_weights"] for x in a])
  assert (w.sum(1) > 0).all()


def test_shard_without_examples_raises(minilm_dir, tmp_path):
  # mlm_nsp skips chunks of < 2 ids: a corpus of one-word documents makes no
  # example at all; next() must raise (not loop over empty epochs forever).
  source = _write_corpus(tmp_path / "words.txt", [[w] for w in _WORDS[:8]])
  cfg = _config(_vocab(minilm_dir), source, objective="mlm_nsp")
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=4)
  with pytest.raises(ValueError, match=r"(?s)empty data shard.*words\.txt.*'mlm_nsp'"):
    next(it)
  with pytest.raises(ValueError, match="empty data shard"):
    next(pipeline.make_eval_iterator(cfg, seed=0, batch_size=4, num_batches=2))


def _settled_stats(it, timeout: float = 120.0) -> dict:
  """it.stats once they stayed the same over three reads 0.5 s apart."""
  seen = [it.stats]
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    time.sleep(0.5)
    seen = seen[-2:] + [it.stats]
    if len(seen) == 3 and seen[0] == seen[1] == seen[2]:
      return seen[-1]
  raise AssertionError(f"pipeline stats still changing after {timeout} s: {seen}")


def test_stats_count_overlong_paragraphs_and_one_token_documents(minilm_dir, tmp_path):
  rng = random.Random(3)
  docs = [[" ".join(rng.choice(_WORDS) for _ in range(8))] for _ in range(6)]
  docs[1].append(" ".join(rng.choice(_WORDS) for _ in range(60)))  # 3 over-long
  docs[4].insert(0, " ".join(rng.choice(_WORDS) for _ in range(45)))
  docs[5].append(" ".join(rng.choice(_WORDS) for _ in range(90)))
  docs += [["the"], ["of"]]  # 2 one-token documents
  source = _write_corpus(tmp_path / "stats.txt", docs)
  # One shard, one group: the counters advance by whole epochs (prefetching
  # may have run several), so each is a multiple of the corpus' count. They
  # advance one after the other, so they are read once prefetching has
  # filled its buffers and stopped.
  cfg = _config(_vocab(minilm_dir), source, objective="mlm_nsp", num_shards=1,
                group_size=16)
  it = pipeline.make_train_iterator(cfg, seed=0, batch_size=2)
  next(it)
  stats = _settled_stats(it)
  assert stats["overlong_paragraphs"] > 0
  assert stats["overlong_paragraphs"] % 3 == 0
  assert stats["skipped_one_token_documents"] == stats["overlong_paragraphs"] // 3 * 2
  assert stats["invalid_utf8_bytes"] == 0


def test_file_sources_are_split_by_file_between_hosts(minilm_dir, tmp_path):
  # 4 files, 4 data shards: file j -> shard j; host p of 2 reads files 2p, 2p+1.
  folder = tmp_path / "files"
  folder.mkdir()
  docs = _docs(11, 24)
  for j in range(4):
    _write_corpus(folder / f"part-{j}.txt", docs[j * 6:(j + 1) * 6])
  cfg = _config(_vocab(minilm_dir), str(folder / "part-*.txt"), num_shards=4)
  whole = pipeline.make_train_iterator(cfg, seed=1, batch_size=8)
  wanted = _take(whole, 3)
  # Each host runs on a copy where the OTHER host's files hold other text:
  # its batches stay the same only if it reads nothing but its own files.
  poisoned = tmp_path / "poisoned"
  poisoned.mkdir()
  parts = []
  for p in range(2):
    for j in range(4):
      text = (folder / f"part-{j}.txt").read_text()
      if j // 2 != p:  # the other host's file
        text = "\n\n".join(f"Poison {j} document {i} with other words." for i in range(9))
      (poisoned / f"part-{j}.txt").write_text(text + "\n")
    cfg.source = str(poisoned / "part-*.txt")
    host = pipeline.make_train_iterator(cfg, seed=1, batch_size=8, process_index=p,
                                        process_count=2)
    assert host.shards == [2 * p, 2 * p + 1]
    parts.append(_take(host, 3))
  for g, a, b in zip(wanted, *parts):
    _assert_same(g, {k: np.concatenate([a[k], b[k]]) for k in g})
  # Exact resume in file mode.
  cfg.source = str(folder / "part-*.txt")
  position = json.loads(json.dumps(whole.position))
  resumed = pipeline.make_train_iterator(cfg, seed=1, batch_size=8, position=position)
  for want, got in zip(_take(whole, 3), _take(resumed, 3)):
    _assert_same(want, got)


def _pair_docs(seed, num_docs, max_num_tokens):
  """Documents of paragraphs of unique ids, some over-long, some of one id."""
  rng = random.Random(seed)
  docs, next_id = [], 5
  for _ in range(num_docs):
    paras = []
    for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
      n = rng.choice([1, rng.randint(2, 25), rng.randint(2, 12),
                      rng.randint(max_num_tokens + 1, 3 * max_num_tokens)])
      paras.append(list(range(next_id, next_id + n)))
      next_id += n
    docs.append(paras)
  return docs


def _segments(docs, max_num_tokens):
  """Reference segments: (doc, first id, last id + 1) of every paragraph piece."""
  segs = []
  for d, paras in enumerate(docs):
    for p in paras:
      for s in range(0, len(p), max_num_tokens):
        piece = p[s:s + max_num_tokens]
        segs.append((d, piece[0], piece[-1] + 1))
  return segs


def _whole_segments(ids, segs, seg_of_start):
  """The segment indices [first, last] if `ids` is a run of whole consecutive segments."""
  first = seg_of_start.get(ids[0])
  if first is None or ids != list(range(ids[0], ids[0] + len(ids))):
    return None
  last = first
  while segs[last][2] < ids[-1] + 1:
    last += 1
  if segs[last][2] != ids[-1] + 1 or segs[last][0] != segs[first][0]:
    return None
  return first, last


@pytest.mark.parametrize("random_next", [True, False])
def test_pairs_are_whole_paragraph_segments(random_next):
  # create_instances_from_document with paragraphs as segments: checked on ids
  # that name their document and position, before truncation.
  import tensorflow as tf
  from bert_jax.data import examples as examples_lib
  m = 29  # seq_length 32
  docs = _pair_docs(0, 120, m)
  ragged = tf.ragged.constant(docs, dtype=tf.int32, ragged_rank=2)
  # In a graph, as in the pipeline's group map.
  pairs = tf.function(lambda r, p: examples_lib.pair_examples(
      r, 32, tf.constant([3, 4], tf.int64), short_seq_prob=p, random_next=random_next))
  out = pairs(ragged, 0.1)
  again = pairs(ragged, 0.1)
  as_list = lambda x: x.to_list() if isinstance(x, tf.RaggedTensor) else x.numpy().tolist()
  for k in out:  # stateless: the same seed gives the same pairs
    assert as_list(out[k]) == as_list(again[k]), k
  segs = _segments(docs, m)
  seg_of_start = {s[1]: i for i, s in enumerate(segs)}
  doc_last = {s[0]: i for i, s in enumerate(segs)}  # last segment of each document
  tokens_a, tokens_b = out["tokens_a"].to_list(), out["tokens_b"].to_list()
  labels = out["nsp_labels"].numpy() if random_next else np.zeros(len(tokens_a), int)
  targets = out["target"].numpy()
  assert len(tokens_a) > 250 and ("nsp_labels" in out) == random_next
  own, split = [], 0
  for a, b, label, target in zip(tokens_a, tokens_b, labels, targets):
    assert a and b and 2 <= target <= m
    wa = _whole_segments(a, segs, seg_of_start)
    wb = _whole_segments(b, segs, seg_of_start)
    if label:  # B: whole segments of ANOTHER document, only as many as reach the target
      assert wb is not None and segs[wb[0]][0] != segs[seg_of_start[a[0]]][0]
      assert wb[0] == wb[1] or len(a) + segs[wb[1]][1] - segs[wb[0]][1] < target
      assert wa is not None
      own.append(a)
    elif wa is None:  # the last segment of a document, cut at a token into A and B
      seg = seg_of_start[a[0]]
      assert doc_last[segs[seg][0]] == seg and b[0] == a[-1] + 1 and b[-1] + 1 == segs[seg][2]
      split += 1
      own.append(a + b)
    else:  # B: the whole segments that follow A in its document
      assert wb is not None and wb[0] == wa[1] + 1 and segs[wb[0]][0] == segs[wa[0]][0]
      # Segments are gathered until they reach the target (or the document ends).
      assert len(a) + len(b) >= target or doc_last[segs[wb[1]][0]] == wb[1]
      assert len(a) + len(b) - (segs[wb[1]][2] - segs[wb[1]][1]) < target or wb[1] == wa[1] + 1
      own.append(a + b)
  # Every segment is used once, in order (a random next puts the unused ones
  # back); only a lone one-id segment at a document's end makes no example.
  used = [i for ids in own for i in ids]
  assert used == sorted(set(used))
  missing = {i for s in segs for i in range(s[1], s[2])} - set(used)
  for i in missing:
    seg = max(j for j, s in enumerate(segs) if s[1] <= i)
    assert segs[seg][2] - segs[seg][1] == 1 and doc_last[segs[seg][0]] == seg
  assert split > 0
  short = np.mean(targets < m)
  assert 0.05 < short < 0.15, short  # short_seq_prob = 0.1
  if random_next:
    assert 0.4 < np.mean(labels) < 0.6
  assert np.all(pairs(ragged, 0.0)["target"].numpy() == m)


def test_nsp_pairs_in_the_pipeline_are_document_text(minilm_dir, corpus, corpus_docs):
  # After truncation A is a piece of one document; B a later piece of the
  # same document (label 0) or a piece of another one (label 1).
  cfg = _config(_vocab(minilm_dir), corpus, objective="mlm_nsp", short_seq_prob=0.5)
  it = pipeline.make_train_iterator(cfg, seed=2, batch_size=8)
  tok = it.tokenizer
  texts = [np.concatenate(tok.tokenize(d).numpy()).tolist() for d in corpus_docs]

  def find(piece):
    n = len(piece)
    return {(d, s) for d, t in enumerate(texts) for s in range(len(t) - n + 1)
            if t[s:s + n] == piece}

  lengths, labels, unique_random = [], [], 0
  for _ in range(4):
    b = next(it)
    orig = _originals(b)
    for row in range(8):
      n = int((orig[row] != 0).sum())
      seps = np.flatnonzero(orig[row][:n] == tok.sep_id)
      a, bb = orig[row][1:seps[0]].tolist(), orig[row][seps[0] + 1:n - 1].tolist()
      where_a, where_b = find(a), find(bb)
      assert where_a and where_b
      if b["nsp_labels"][row]:  # (short pieces of this small vocabulary recur)
        docs_a, docs_b = {d for d, _ in where_a}, {d for d, _ in where_b}
        if len(docs_a) == 1 and len(docs_b) == 1:
          assert docs_a != docs_b
          unique_random += 1
      else:
        assert any(da == db and sb >= sa + len(a) for da, sa in where_a for db, sb in where_b)
      lengths.append(n)
      labels.append(int(b["nsp_labels"][row]))
  assert set(labels) == {0, 1} and unique_random >= 5
  # short_seq_prob=0.5: many examples end well before seq_length.
  assert np.mean(np.array(lengths) < 20) > 0.2


# ----------------------------------------------------------------------------
# tfds sources: a split stored in several shard files, prepared offline.
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_corpus(tmp_path_factory):
  """data_dir of tfds 'pipe_corpus': 24 documents in 4 shard files."""
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds = pytest.importorskip("tensorflow_datasets")
  prepare_tfds(data_dir, "pipe_corpus", {"text": tfds.features.Text()},
               {"train": {"text": ["\n".join(d) for d in _docs(13, 24)]}}, num_files=4)
  return data_dir


def test_tfds_sources_are_split_by_file_between_hosts(minilm_dir, tfds_corpus, tmp_path,
                                                      caplog, monkeypatch):
  import shutil
  # 4 files, 2 data shards: shard s reads files s and s + 2; host p of 2 runs shard p.
  monkeypatch.setattr(pipeline, "_LOGGED_WHOLE_SOURCE", set())
  cfg = _config(_vocab(minilm_dir), "tfds:pipe_corpus:text", data_dir=str(tfds_corpus))
  with caplog.at_level("INFO"):
    whole = pipeline.make_train_iterator(cfg, seed=1, batch_size=4)
  assert "stored in 4 files; data shard s reads only files j with j % 2 == s" in caplog.text
  wanted = _take(whole, 3)
  position = json.loads(json.dumps(whole.position))
  assert min(position["group"]) >= 1, position  # resuming below skips documents
  after = _take(whole, 3)
  files = sorted((tfds_corpus / "pipe_corpus" / "1.0.0").glob("*.tfrecord*"))
  assert len(files) == 4
  # Each host runs on a copy without the OTHER host's files: reading any of
  # them would fail, so it opens only its own.
  parts, resumed = [], []
  for p in range(2):
    copy = tmp_path / f"host{p}"
    shutil.copytree(tfds_corpus, copy)
    for j in range(4):
      if j % 2 != p:
        (copy / "pipe_corpus" / "1.0.0" / files[j].name).unlink()
    cfg.data_dir = str(copy)
    host = pipeline.make_train_iterator(cfg, seed=1, batch_size=4, process_index=p,
                                        process_count=2)
    assert host.shards == [p]
    parts.append(_take(host, 3))
    # Exact resume on a host from the single-host position (keyed by shard).
    again = pipeline.make_train_iterator(cfg, seed=1, batch_size=4, process_index=p,
                                         process_count=2, position=position)
    resumed.append(_take(again, 3))
  for g, a, b in zip(wanted, *parts):
    _assert_same(g, {k: np.concatenate([a[k], b[k]]) for k in g})
  for g, a, b in zip(after, *resumed):
    _assert_same(g, {k: np.concatenate([a[k], b[k]]) for k in g})


def test_tfds_with_fewer_files_than_shards_reads_documents(minilm_dir, tfds_corpus,
                                                           caplog, monkeypatch):
  # 4 files, 8 data shards: document mode, logged with how to avoid it.
  monkeypatch.setattr(pipeline, "_LOGGED_WHOLE_SOURCE", set())
  cfg = _config(_vocab(minilm_dir), "tfds:pipe_corpus:text", data_dir=str(tfds_corpus),
                num_shards=8)
  with caplog.at_level("INFO"):
    it = pipeline.make_train_iterator(cfg, seed=1, batch_size=8, process_index=1,
                                      process_count=2)
  assert ("is a tfds split stored in 4 file(s), fewer than data.num_shards=8" in caplog.text)
  assert "every host reads the whole source" in caplog.text
  assert "`tfds build ... --num_shards=8`) or lower data.num_shards" in caplog.text
  assert next(it)["encoder_input_tokens"].shape == (4, 32)
  assert it.shards == [4, 5, 6, 7]
