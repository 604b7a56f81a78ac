"""NER heads: the linear-chain CRF (forward algorithm, Viterbi, BIO constraints), the
span head (span targets, decoding back to BIO) and both end to end through `finetune`."""
import itertools
import pathlib

import jax
import numpy as np
import optax
import pytest

from bert_jax import defaults
from bert_jax import finetune
from bert_jax import objectives
from bert_jax.models import bert
from bert_jax.models import crf
from bert_jax.models import span
from bert_jax.tasks import ner
from test_finetune import _random_init_config, _records, _vocab

NAMES = ("O", "B-X", "I-X")


def _random_crf(seed, batch=3, length=4, labels=3):
  rng = np.random.RandomState(seed)
  return (rng.normal(size=(batch, length, labels)).astype(np.float32),
          rng.normal(size=(labels, labels)).astype(np.float32),
          rng.normal(size=labels).astype(np.float32), rng.normal(size=labels).astype(np.float32))


# Row 0 is full, row 1 shorter (a padded prefix), row 2 has holes like NER
# features ([CLS], continuation sub-words): the chain runs over its 1s only.
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 0, 1]], np.int32)


def _paths_of(mask_row, labels):
  """Every tag path over the masked positions, as full rows (0 elsewhere)."""
  where = np.flatnonzero(mask_row)
  for path in itertools.product(range(labels), repeat=len(where)):
    row = np.zeros(len(mask_row), np.int32)
    row[where] = path
    yield row, path


def _score(e, path, where, trans, start, end):
  s = start[path[0]] + end[path[-1]] + sum(e[t, y] for t, y in zip(where, path))
  return s + sum(trans[a, b] for a, b in zip(path[:-1], path[1:]))


def _brute_force(e, mask_row, trans, start, end):
  """{full row: score} over all L^n paths of one row."""
  where = np.flatnonzero(mask_row)
  return {tuple(row): _score(e, path, where, trans, start, end)
          for row, path in _paths_of(mask_row, e.shape[-1])}


# ------------------------------------------------------------------- the CRF


def test_forward_algorithm_equals_brute_force():
  e, trans, start, end = _random_crf(0)
  tags = np.array([[0, 1, 2, 1], [2, 0, 1, -100], [-100, 2, -100, 0]], np.int32)
  ll = np.asarray(crf.crf_log_likelihood(e, tags, MASK, trans, start, end))
  for b in range(3):
    scores = _brute_force(e[b], MASK[b], trans, start, end)
    log_z = np.logaddexp.reduce(list(scores.values()))
    gold = tuple(np.where(MASK[b] > 0, tags[b], 0))
    np.testing.assert_allclose(ll[b], scores[gold] - log_z, rtol=1e-5, atol=1e-5)
  # A probability distribution over all paths of each row.
  every = [(b, row) for b in range(3) for row, _ in _paths_of(MASK[b], 3)]
  ll_all = crf.crf_log_likelihood(e[[b for b, _ in every]], np.stack([r for _, r in every]),
                                  MASK[[b for b, _ in every]], trans, start, end)
  for b in range(3):
    rows = [i for i, (row_of, _) in enumerate(every) if row_of == b]
    assert abs(np.logaddexp.reduce(np.asarray(ll_all)[rows])) < 1e-4
  # No labelled position: nothing to score (filler rows).
  assert float(crf.crf_log_likelihood(e[:1], tags[:1], 0 * MASK[:1], trans, start, end)[0]) == 0


def test_viterbi_equals_brute_force_argmax():
  e, trans, start, end = _random_crf(1)
  tags, score = crf.viterbi_decode(e, MASK, trans, start, end)
  for b in range(3):
    scores = _brute_force(e[b], MASK[b], trans, start, end)
    best = max(scores, key=scores.get)
    assert tuple(np.asarray(tags[b])) == best
    np.testing.assert_allclose(float(score[b]), scores[best], rtol=1e-5)


def test_bio_constraints_rule_out_invalid_paths():
  allowed, first, last = crf.allowed_transitions(("O", "B-X", "I-X", "B-Y", "I-Y"))
  assert not first[2] and not first[4] and first[[0, 1, 3]].all() and last.all()
  assert allowed[:, 2].tolist() == [False, True, True, False, False]  # I-X after B-X, I-X
  assert allowed[:, 4].tolist() == [False, False, False, True, True]
  assert allowed[:, [0, 1, 3]].all()
  with pytest.raises(ValueError, match="unknown tagging scheme 'BIOES'"):
    crf.allowed_transitions(NAMES, "BIOES")

  # Emissions that love I-X: unconstrained Viterbi emits it after O / first;
  # constrained, never, and it equals the best path among the valid ones.
  rng = np.random.RandomState(2)
  e = rng.normal(size=(16, 5, 3)).astype(np.float32)
  e[..., 2] += 2.0
  trans, start, end = (rng.normal(size=s).astype(np.float32) for s in ((3, 3), 3, 3))
  mask = np.ones((16, 5), np.int32)
  mask[::2, 0] = 0  # some rows start later
  free, _ = crf.viterbi_decode(e, mask, trans, start, end)
  rules = crf.allowed_transitions(NAMES)
  tags, _ = crf.viterbi_decode(e, mask, *crf.constrain(trans, start, end, *rules))

  def invalid(row, m):
    chain = [NAMES[t] for t, keep in zip(row, m) if keep]
    return any(t == "I-X" and p not in ("B-X", "I-X") for p, t in zip(["O"] + chain, chain))
  assert any(invalid(r, m) for r, m in zip(np.asarray(free), mask))
  assert not any(invalid(r, m) for r, m in zip(np.asarray(tags), mask))
  for b in (0, 1):
    scores = {k: v for k, v in _brute_force(e[b], mask[b], trans, start, end).items()
              if not invalid(k, mask[b])}
    assert tuple(np.asarray(tags[b])) == max(scores, key=scores.get)


# -------------------------------------------------------------- the CRF head

TINY = dict(vocab_size=24, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
            max_position_embeddings=16, dropout_rate=0.0, attention_dropout_rate=0.0)


def test_crf_head_gradient_is_finite_and_fits_a_toy_batch():
  model = bert.build(bert.BertConfig(**TINY), "crf_token_classification", num_labels=3,
                     label_names=NAMES)
  assert bert.task_of(model) == "crf_token_classification"
  # [CLS] w w w [SEP] pad: labels on words; the tag depends on the token id.
  tokens = np.array([[2, 5, 6, 7, 3, 0], [2, 7, 5, 3, 0, 0], [2, 6, 6, 5, 8, 3]], np.int32)
  by_token = {5: 1, 6: 2, 7: 0, 8: 0}
  labels = np.vectorize(lambda t: by_token.get(t, -100))(tokens).astype(np.int32)
  labels[2, 1:4] = [1, 2, 2]  # B-X I-X I-X
  batch = {"encoder_input_tokens": tokens, "token_labels": labels,
           "example_weights": np.ones(3, np.float32)}
  objective = objectives.get("crf_token_classification")
  params = model.init(jax.random.key(0), tokens)["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  assert set(params) == {"encoder", "classifier", "crf"}
  tx = optax.adam(3e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      out = model.apply({"params": p}, tokens)
      return objective.loss(objective.metrics(out, batch), objective.normalizers(batch))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  losses = []
  for i in range(40):
    params, opt_state, loss, grads = step(params, opt_state)
    if i == 0:
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.2 * losses[0], losses
  tags = np.asarray(crf.decode(model.apply({"params": params}, tokens), labels != -100))
  np.testing.assert_array_equal(np.where(labels != -100, tags, -100), labels)


# ------------------------------------------------------------------- spans


def test_span_targets_round_trip_to_bio_and_hold_nested_spans():
  names = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
  types = ner.entity_types(names)
  assert types == ("LOC", "PER")
  tags = "B-PER I-PER O B-LOC B-LOC I-LOC I-LOC O B-PER".split()
  gold = ner.extract_entities(tags)
  array = ner.span_label_array(gold, len(tags), 12, 4, types)
  assert array.shape == (12, 4) and (array[9:] == -100).all() and (array[7, 2:] == -100).all()
  assert array[0, 1] == 2 and array[3, 0] == 1 and array[4, 2] == 1 and array[8, 0] == 2
  assert (array[:9] > 0).sum() == len(gold)
  # Perfect logits (one-hot of the targets) decode to the same tags.
  one_hot = 10.0 * np.eye(3)[np.maximum(array, 0)]
  assert ner.spans_to_tags(ner.decode_spans(one_hot, len(tags), types), len(tags)) == tags
  assert ner.span_word_predictions(one_hot, np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, -1]),
                                   names) == tags + ["O"]
  # An entity longer than max_span_length has no cell.
  assert (ner.span_label_array([("LOC", 0, 4)], 6, 8, 4, types) <= 0).all()

  # Nested: 'University of Paris' (ORG-like LOC 0..2) holding 'Paris' (LOC 2).
  nested = [("PER", 0, 2), ("LOC", 2, 2)]
  array = ner.span_label_array(nested, 3, 3, 3, types)
  assert array[0, 2] == 2 and array[2, 0] == 1
  logits = 10.0 * np.eye(3)[np.maximum(array, 0)]
  logits[2, 0, 1] = 5.0  # the inner span is the less sure one
  assert ner.decode_spans(logits, 3, types, flat=False) == nested
  assert ner.decode_spans(logits, 3, types) == [("PER", 0, 2)]  # flat: overlaps skipped
  with pytest.raises(ValueError, match="overlaps"):
    ner.spans_to_tags(nested, 3)


def test_span_bounds_and_head_shapes():
  # [CLS] a ##a b c ##c [SEP] pad: words start at 1, 3, 4; [SEP] at 6.
  tokens = np.array([[2, 5, 6, 7, 8, 9, 3, 0]], np.int32)
  starts = np.array([[0, 1, 0, 1, 1, 0, 0, 0]], np.int32)
  bounds, num_words = span.span_bounds(starts, tokens, 0)
  assert int(num_words[0]) == 3 and np.asarray(bounds)[0, :5].tolist() == [1, 3, 4, 6, 6]
  assert np.asarray(span.span_mask(num_words, 8, 2))[0, :4].tolist() == [
      [True, True], [True, True], [True, False], [False, False]]
  model = bert.build(bert.BertConfig(**TINY), "span_classification", num_labels=3,
                     max_span_length=2)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  out = jax.eval_shape(lambda p: model.apply(p, tokens, word_starts=starts), {"params": params})
  assert out["span_logits"].shape == (1, 8, 2, 3)
  assert set(params) == {"encoder", "span"}


def test_span_representation_is_start_end_and_mean():
  """Before its nonlinearity a span is start(h[first token]) + end(h[last token]) +
  mean(h[its tokens]) through the three dense kernels: checked span by span."""
  cfg = bert.BertConfig(**dict(TINY, hidden_size=8))
  tokens = np.array([[2, 5, 6, 7, 8, 9, 3, 0]], np.int32)
  bounds, _ = span.span_bounds(np.array([[0, 1, 0, 1, 1, 0, 0, 0]], np.int32), tokens, 0)
  head = span.SpanHead(cfg, num_labels=3, max_span_length=3)
  hidden = np.random.RandomState(0).normal(size=(1, 8, 8)).astype(np.float32)
  variables = head.init(jax.random.key(0), hidden, bounds, False)
  _, state = head.apply(variables, hidden, bounds, False, capture_intermediates=True)
  got = {k: np.asarray(v["__call__"][0])[0] for k, v in state["intermediates"].items()
         if k in ("start", "end", "mean", "norm")}
  words = [(1, 3), (3, 4), (4, 6)]  # token ranges [first, after) of the three words
  for i, k in itertools.product(range(3), range(3)):
    if i + k < 3:
      first, after = words[i][0], words[i + k][1]
      x = got["start"][first] + got["end"][after - 1] + got["mean"][first:after].mean(0)
      x = np.asarray(jax.nn.gelu(x, approximate=False))
      x = (x - x.mean()) / np.sqrt(x.var() + cfg.layer_norm_eps)  # norm at init: 1, 0
      np.testing.assert_allclose(got["norm"][i, k], x, atol=1e-5)


# -------------------------------------------------------------- end to end

_TRAIN = [("EU rejects German call", "B-ORG O B-MISC O"),
          ("Peter Blackburn visited Bonn", "B-PER I-PER O B-LOC"),
          ("the European Commission said", "O B-ORG I-ORG O"),
          ("Germany 's representative", "B-LOC O O"),
          ("John Smith went to Paris today", "B-PER I-PER O O B-LOC O"),
          ("he said", "O O"),
          ("British lamb", "B-MISC O"),
          ("Werner Zwingmann told Bonn officials", "B-PER I-PER O B-LOC O")]


@pytest.fixture(scope="module")
def conll_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("conll")
  lines = ["-DOCSTART- -X- -X- O", ""]
  for words, tags in _TRAIN:
    lines += [f"{w} NN O {t}" for w, t in zip(words.split(), tags.split())] + [""]
  (folder / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  _vocab(folder / "vocab.txt", [words for words, _ in _TRAIN])
  return folder


def _config(conll_dir, head):
  return _random_init_config(
      "conll", conll_dir, conll_dir / "vocab.txt", **{
          "finetune.ner_head": head, "finetune.max_span_length": 3,
          "model.num_layers": 1, "data.train_split": "train.txt", "data.eval_splits": "train.txt",
          "data.predict_split": "train.txt", "data.max_length": 16, "data.padding": "max",
          "train.batch_size": 8, "eval.batch_size": 8, "train.num_epochs": 2,
          "optim.learning_rate": 1e-3})


@pytest.mark.parametrize("head", ["crf", "span"])
def test_finetune_and_predict_with_each_head(conll_dir, tmp_path, head):
  config = _config(conll_dir, head)
  workdir = tmp_path / "run"
  result = finetune.finetune(config, str(workdir))
  records = _records(workdir)
  prefix = {"crf": "crf", "span": "ner_span"}[head]
  train = [r for r in records if f"train/{prefix}/loss" in r]
  assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
  evals = [r for r in records if "eval/train.txt/f1" in r]
  assert len(evals) == 2 and 0.0 <= evals[-1]["eval/train.txt/f1"] <= 1.0
  assert result["best"]["metric"] == "train.txt/f1"

  path = finetune.predict(config, str(workdir), out=str(tmp_path / "preds"))
  predicted = ner.read_conll(path, num_columns=3).sentences
  assert [s.words for s in predicted] == [tuple(w.split()) for w, _ in _TRAIN]
  labels = set(ner.label_names_of(ner.read_conll(str(conll_dir / "train.txt")).sentences))
  assert all(set(s.tags) <= labels for s in predicted)
  gold = pathlib.Path(path).read_text(encoding="utf-8").split("\n\n")[0].split("\n")
  assert [line.split()[1] for line in gold] == _TRAIN[0][1].split()


def test_bad_ner_head_is_a_one_line_error(conll_dir):
  config = _config(conll_dir, "bilstm")
  with pytest.raises(defaults.ConfigError) as error:
    finetune.validate(config)
  message = str(error.value)
  assert message.startswith("config.finetune.ner_head: unknown NER head 'bilstm'")
  assert "\n" not in message
  config = _config(conll_dir, "span")
  config.data.label_all_subwords = True
  with pytest.raises(defaults.ConfigError, match=r"^config\.data\.label_all_subwords: "):
    finetune.validate(config)
