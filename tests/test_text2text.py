"""Text-to-text: casting round trips, features, cached greedy/beam decoding, scoring, tuning."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import decoding
from bert_jax import losses
from bert_jax import objectives
from bert_jax.data import sources
from bert_jax.data import tokenizer as tok_lib
from bert_jax.models import t5
from bert_jax.tasks import glue
from bert_jax.tasks import ner
from bert_jax.tasks import squad
from bert_jax.tasks import text2text as tt

EOS = 1
# The test-side jits (init, full pass, train step) need no optimised code.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _init(model, enc, dec_len, seed=0):
  # Jitted: op-by-op initialisation is several times slower on CPU.
  init = jax.jit(model.init, compiler_options=FAST_COMPILE)
  variables = init(jax.random.key(seed), jnp.asarray(enc),
                   jnp.zeros((enc.shape[0], dec_len), jnp.int32))
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, variables["params"],
                      is_leaf=lambda x: hasattr(x, "unbox"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A tiny T5-layout SentencePiece model (pad 0, eos 1, unk 2, 100 extra ids)."""
  folder = tmp_path_factory.mktemp("t2t_spm")
  return tok_lib.train_sentencepiece(sources.iter_paragraphs("builtin:pydoc_topics"),
                                     str(folder / "spm"), 256, input_sentence_size=3000,
                                     num_threads=2)


# ----------------------------------------------------------------------------
# Decoding on a random tiny model
# ----------------------------------------------------------------------------

V, L = 32, 10


@pytest.fixture(scope="module")
def random_model():
  """Tiny T5 v1.1 with the EOS logit column scaled up, so some rows end early, some never."""
  model = t5.T5Model(t5.T5Config.preset("t5_v1_1_tiny", vocab_size=V))
  rng = np.random.default_rng(0)
  enc = rng.integers(2, V, (6, 9)).astype(np.int32)
  enc[:, -1] = EOS
  enc[3, 4], enc[3, 5:] = EOS, 0  # a padded row
  params = _init(model, enc, L)
  kernel = params["logits_dense"]["kernel"]
  params["logits_dense"]["kernel"] = kernel.at[:, EOS].multiply(2.0)
  return model, params, enc


@functools.partial(jax.jit, static_argnames="model", compiler_options=FAST_COMPILE)
def _full_log_probs(params, enc, dec_in, *, model):
  logits = model.apply({"params": params}, enc, dec_in)
  return jax.nn.log_softmax(logits, axis=-1)  # [batch, dec_len, vocab]


def _sequence_log_probs(model, params, enc, seqs):
  """Teacher-forced (uncached) log-prob of each sequence up to its first EOS, and its length."""
  seqs = np.asarray(seqs)
  dec_in = np.zeros_like(seqs)
  dec_in[:, 1:] = seqs[:, :-1]
  logp = np.asarray(_full_log_probs(params, enc, dec_in, model=model))
  token_logp = np.take_along_axis(logp, seqs[:, :, None], axis=-1)[:, :, 0]
  totals, lengths = [], []
  for row, lp in zip(seqs, token_logp):
    n = list(row).index(EOS) + 1 if EOS in row else len(row)
    totals.append(lp[:n].sum())
    lengths.append(n)
  return np.array(totals), np.array(lengths)


def _check_padding_after_eos(seqs):
  for row in np.asarray(seqs).reshape(-1, np.asarray(seqs).shape[-1]):
    row = list(row)
    if EOS in row:
      assert not any(row[row.index(EOS) + 1:]), row


def test_greedy_equals_argmax_of_full_pass(random_model):
  model, params, enc = random_model
  tokens, log_probs = decoding.greedy_decode(model, params, enc, max_decode_length=L, eos_id=EOS)
  tokens = np.asarray(tokens)
  # Step by step with the full, uncached decoder: argmax at position i. The
  # decoder is causal, so the not yet written (zero) positions after i do not
  # change position i; one fixed shape means one compilation.
  batch = enc.shape[0]
  dec = np.zeros((batch, L + 1), np.int32)
  totals, finished = np.zeros(batch), np.zeros(batch, bool)
  for i in range(L):
    logp = np.asarray(_full_log_probs(params, enc, dec[:, :L], model=model))[:, i]
    nxt = np.where(finished, 0, logp.argmax(-1))
    totals += np.where(finished, 0.0, logp[np.arange(batch), nxt])
    dec[:, i + 1] = nxt
    finished |= nxt == EOS
  np.testing.assert_array_equal(tokens, dec[:, 1:])
  np.testing.assert_allclose(log_probs, totals, atol=1e-4)
  # The setup exercises both endings: EOS before max length, and none at all.
  ended = [EOS in row for row in tokens.tolist()]
  assert any(ended) and not all(ended)
  _check_padding_after_eos(tokens)


def test_beam_size_one_is_greedy(random_model):
  model, params, enc = random_model
  greedy, greedy_lp = decoding.greedy_decode(model, params, enc, max_decode_length=L, eos_id=EOS)
  beams, scores = decoding.beam_search(model, params, enc, beam_size=1, max_decode_length=L,
                                       alpha=0.0, eos_id=EOS)
  assert beams.shape == (enc.shape[0], 1, L)
  np.testing.assert_array_equal(beams[:, 0], greedy)
  np.testing.assert_allclose(scores[:, 0], greedy_lp, atol=1e-5)


def test_beam_search_beats_greedy_and_reports_full_pass_scores(random_model):
  model, params, enc = random_model
  k = 4
  greedy, _ = decoding.greedy_decode(model, params, enc, max_decode_length=L, eos_id=EOS)
  greedy_lp, _ = _sequence_log_probs(model, params, enc, greedy)
  for alpha in (0.0, 0.6):
    beams, scores = decoding.beam_search(model, params, enc, beam_size=k, max_decode_length=L,
                                         alpha=alpha, eos_id=EOS)
    beams, scores = np.asarray(beams), np.asarray(scores)
    assert beams.shape == (enc.shape[0], k, L) and scores.shape == (enc.shape[0], k)
    _check_padding_after_eos(beams)
    assert np.all(np.diff(scores, axis=1) <= 0), "beams must be sorted best first"
    for b in range(enc.shape[0]):
      assert len({tuple(s) for s in beams[b]}) == k, "beams must be distinct sequences"
    # [batch, k]; one beam rank at a time keeps the full pass at one shape.
    lp, lengths = map(np.stack, zip(*[_sequence_log_probs(model, params, enc, beams[:, j])
                                      for j in range(k)]))
    lp, lengths = lp.T, lengths.T
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(scores, lp / penalty, atol=1e-4, rtol=0)
    greedy_len = np.array([list(r).index(EOS) + 1 if EOS in r else L
                           for r in np.asarray(greedy).tolist()])
    greedy_score = greedy_lp / ((5.0 + greedy_len) / 6.0) ** alpha
    # Not a theorem for beam search (the greedy prefix can be pruned), but it
    # holds on this fixed model; the exhaustive test below checks exactness.
    assert np.all(scores[:, 0] >= greedy_score - 1e-5), (scores[:, 0], greedy_score)
    if alpha == 0.0:
      assert np.all(lp[:, 0] >= greedy_lp - 1e-5)


def test_predict_texts_decodes_the_best_beam(random_model, tokenizer):
  model, params, enc = random_model
  beams, _ = decoding.beam_search(model, params, enc, beam_size=4, max_decode_length=L, alpha=0.6,
                                  eos_id=EOS)
  texts = tt.predict_texts(model, params, tokenizer, enc, batch_size=enc.shape[0],
                           max_decode_length=L, beam_size=4, alpha=0.6)
  assert texts == tt.ids_to_texts(tokenizer, np.asarray(beams)[:, 0])
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    tt.predict_texts(model, params, tokenizer, enc, batch_size=2, max_decode_length=L,
                     beam_size=4, alpha=-1.0)


def test_wide_beam_finds_the_exhaustive_optimum(random_model):
  """With k = vocab**(L-1) no prefix is ever pruned: beam search is exact search."""
  model, params, enc = random_model
  length, k, alpha = 2, V, 0.6
  beams, scores = decoding.beam_search(model, params, enc, beam_size=k, max_decode_length=length,
                                       alpha=alpha, eos_id=EOS)
  # Every hypothesis: EOS first (padding after), or any first token and any second.
  # A full pass on [start, t] gives log p(t) and log p(. | t) for every second token.
  logp = np.stack([_full_log_probs(params, enc, np.tile([[0, t] + [0] * (L - 2)], (len(enc), 1)),
                                   model=model)[:, :2] for t in range(V)], axis=1)
  # logp: [batch, first token, position, vocab]
  two = (logp[:, 0, 0, :, None] + logp[:, :, 1]) / ((5.0 + 2) / 6.0) ** alpha
  two[:, EOS] = -np.inf  # a sequence ends at EOS
  one = logp[:, 0, 0, EOS] / ((5.0 + 1) / 6.0) ** alpha
  exact = np.concatenate([one[:, None], two.reshape(len(enc), -1)], axis=1)
  sequences = [(EOS, 0)] + list(itertools.product(range(V), repeat=2))
  for b in range(enc.shape[0]):
    order = np.argsort(-exact[b], kind="stable")
    np.testing.assert_allclose(scores[b], exact[b, order[:k]], atol=1e-4)
    assert tuple(beams[b, 0]) == sequences[order[0]]


def _repeated_ngrams(row, n):
  """The n-grams of row's generated tokens (up to EOS) that occur more than once."""
  row = list(row)
  row = row[:row.index(EOS)] if EOS in row else row
  grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
  return {g for g in grams if grams.count(g) > 1}


def test_constrain_bans_exactly_the_repeating_tokens():
  rng = np.random.default_rng(1)
  rows, width, vocab = 5, 12, 4  # a small vocabulary, so n-grams repeat often
  seqs = rng.integers(2, vocab, (rows, width)).astype(np.int32)
  for n in (2, 3):
    for i in range(width - 1):
      logp = np.zeros((rows, vocab), np.float32)
      out = np.asarray(decoding.constrain(jnp.asarray(logp), jnp.asarray(seqs), jnp.asarray(i),
                                          eos_id=EOS, min_length=4, no_repeat_ngram=n))
      for r in range(rows):
        generated = list(seqs[r, 1:i + 1])
        banned = {generated[j + n - 1] for j in range(len(generated) - n + 1)
                  if len(generated) >= n and generated[j:j + n - 1] == generated[-(n - 1):]}
        if i < 4:
          banned.add(EOS)
        assert {t for t in range(vocab) if out[r, t] <= decoding.NEG_INF / 2} == banned, (n, i, r)


def test_min_length_and_no_repeat_ngram_hold_in_both_searches(random_model):
  model, params, enc = random_model
  plain, _ = decoding.greedy_decode(model, params, enc, max_decode_length=L, eos_id=EOS)
  plain = np.asarray(plain).tolist()
  # The unconstrained decode breaks both rules, so the constraints have work to do.
  assert any(EOS in row[:5] for row in plain)
  assert any(_repeated_ngrams(row, 2) for row in plain)
  greedy, _ = decoding.greedy_decode(model, params, enc, max_decode_length=L, eos_id=EOS,
                                     min_length=5, no_repeat_ngram=2)
  beams, scores = decoding.beam_search(model, params, enc, beam_size=3, max_decode_length=L,
                                       alpha=0.6, eos_id=EOS, min_length=5, no_repeat_ngram=2)
  rows = np.asarray(greedy).tolist() + np.asarray(beams).reshape(-1, L).tolist()
  for row in rows:
    assert EOS not in row[:5], row
    assert not _repeated_ngrams(row, 2), row
  _check_padding_after_eos(beams)
  assert np.all(np.asarray(scores) > decoding.NEG_INF / 2)


def test_label_smoothing_is_the_seq2seq_terms_training_option(random_model):
  """steps.train_step's label_smoothing reaches the seq2seq loss; the eval step stays plain."""
  model, params, enc = random_model
  dec = np.random.default_rng(2).integers(2, V, (enc.shape[0], L)).astype(np.int32)
  batch = {"decoder_target_tokens": jnp.asarray(dec),
           "decoder_loss_weights": jnp.asarray((dec > 0).astype(np.float32))}
  logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  objective = objectives.get("seq2seq")
  for smoothing in (0.0, 0.1):
    got = objective.metrics(logits, batch, z_loss=0.0, label_smoothing=smoothing)
    _, want = losses.seq2seq_loss(logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"], label_smoothing=smoothing)
    np.testing.assert_allclose(got["seq2seq/loss_sum"], want["seq2seq/loss_sum"], rtol=1e-6)
  plain = objective.metrics(logits, batch)["seq2seq/loss_sum"]
  assert float(got["seq2seq/loss_sum"]) != pytest.approx(float(plain), rel=1e-3)


# ----------------------------------------------------------------------------
# Casting and scoring
# ----------------------------------------------------------------------------

def _example(task, label, a="A first sentence .", b="A second one ."):
  pair = glue.get_task(task).is_pair
  return glue.GlueExample(f"mem:{task}", 0, a, b if pair else None, label)


def test_glue_inputs_follow_t5():
  assert tt.glue_inputs("sst2", _example("sst2", "1", a="a gem .")) == "sst2 sentence: a gem ."
  ex = _example("mnli", "neutral", a="The premise.", b="The hypothesis.")
  assert tt.glue_inputs("mnli", ex) == "mnli hypothesis: The hypothesis. premise: The premise."
  assert tt.glue_inputs("ax", ex).startswith("mnli hypothesis:")
  assert tt.glue_inputs("qnli", _example("qnli", "entailment", "Who?", "Him.")) == (
      "qnli question: Who? sentence: Him.")
  assert tt.glue_inputs("stsb", _example("stsb", 1.0, "x", "y")) == "stsb sentence1: x sentence2: y"
  with pytest.raises(ValueError, match="mem:rte.*pair"):
    tt.glue_inputs("rte", glue.GlueExample("mem:rte", 0, "x", None, "entailment"))


@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_glue_label_text_round_trip(task):
  info = glue.get_task(task)
  if info.is_regression:
    assert tt.glue_target(task, 3.77) == "3.8" and tt.glue_target(task, 0.0) == "0.0"
    assert tt.glue_target(task, 5.0) == "5.0" and tt.glue_target(task, 2.17) == "2.2"
    for value in np.arange(26) / 5:  # every rounded score survives the round trip
      assert tt.glue_label(task, tt.glue_target(task, value)) == pytest.approx(value)
    assert tt.glue_label(task, "about four") is None
    return
  words = [tt.glue_target(task, label) for label in info.label_names]
  assert len(set(words)) == len(words)
  for label in info.label_names:
    assert tt.glue_label(task, tt.glue_target(task, label)) == label
  assert tt.glue_label(task, "banana") is None
  with pytest.raises(ValueError, match="not in the"):
    tt.glue_target(task, "no-such-label")


def test_t5_label_words():
  assert [tt.glue_target("sst2", x) for x in "01"] == ["negative", "positive"]
  assert [tt.glue_target("cola", x) for x in "01"] == ["unacceptable", "acceptable"]
  assert tt.glue_target("wnli", "1") == "entailment"
  assert tt.glue_target("qqp", "1") == "duplicate"


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "mnli", "rte"])
def test_glue_metrics_on_gold_text_equal_label_metrics(task):
  info = glue.get_task(task)
  rng = np.random.default_rng(1)
  if info.is_regression:
    labels = [float(x) for x in rng.uniform(0, 5, 20).round(2)]
  else:
    labels = [info.label_names[i] for i in rng.integers(0, info.num_labels, 20)]
  examples = [_example(task, y) for y in labels]
  _, targets = tt.glue_to_text(task, examples)
  got = tt.glue_metrics(task, targets, examples)
  assert got["num_unparseable"] == 0
  ids = np.stack([glue.label_id(task, y) for y in labels])
  # STS-B targets are rounded to 0.2: perfect decoding scores the rounded labels.
  predicted = np.round(ids * 5) / 5 if info.is_regression else ids
  expected = glue.compute_metrics(task, predicted, ids)
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-9), key
  if not info.is_regression:
    assert got["accuracy"] == 1.0
  # An unparseable prediction is wrong, never a silent skip.
  bad = tt.glue_metrics(task, ["what?"] + targets[1:], examples)
  assert bad["num_unparseable"] == 1
  if not info.is_regression:
    assert bad["accuracy"] == pytest.approx(19 / 20)


def test_glue_metrics_on_real_dev_sets(shared_data):
  for task, folder in (("sst2", "sst2"), ("mrpc", "mrpc")):
    examples = glue.read_tsv(str(shared_data / folder), task, "dev")[:200]
    inputs, targets = tt.glue_to_text(task, examples)
    assert inputs[0].startswith(f"{task} sentence")
    got = tt.glue_metrics(task, targets, examples)
    assert got["accuracy"] == 1.0 and got["num_unparseable"] == 0
    flipped = [tt.glue_target(task, "1" if ex.label == "0" else "0") for ex in examples]
    assert tt.glue_metrics(task, flipped, examples)["accuracy"] == 0.0


def test_ner_text_round_trip_and_parsing():
  words = ("EU", "rejects", "German", "call", "to", "boycott", "German", "lamb", "New", "York")
  tags = ("B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "B-LOC", "I-LOC")
  text = tt.ner_target(words, tags)
  assert text == "EU = ORG ; German = MISC ; German = MISC ; New York = LOC"
  assert tt.ner_tags(words, text) == (list(tags), 0)
  assert tt.ner_target(("no", "names"), ("O", "O")) == "none"
  assert tt.ner_tags(("no", "names"), "none") == (["O", "O"], 0)
  # Repeats are placed in order; unplaceable or malformed items are dropped and counted.
  got, dropped = tt.ner_tags(words, "German = MISC ; Paris = LOC ; garbage ; German = PER")
  assert got[2] == "B-MISC" and got[6] == "B-PER" and dropped == 2
  sentence = ner.NerSentence(words, tags, "mem:1")
  assert tt.ner_metrics([sentence], [text])["f1"] == 1.0
  half = tt.ner_metrics([sentence], ["EU = ORG ; German = MISC"])
  assert half["recall"] == pytest.approx(0.5) and half["precision"] == 1.0


def test_ner_round_trip_on_real_conll(shared_data):
  data = ner.read_conll(str(shared_data / "conll2003" / "valid.txt.gz"))
  inputs, targets = tt.ner_to_text(data.sentences)
  assert inputs[1].startswith("ner sentence: ")
  for s, t in zip(data.sentences, targets):
    assert tt.ner_tags(s.words, t) == (list(s.tags), 0), s.source
  got = tt.ner_metrics(data.sentences, targets)
  assert got["f1"] == 1.0 and got["num_gold"] > 5000 and got["num_unparseable"] == 0


def test_squad_text_and_metric_on_real_dev(shared_data):
  data = squad.read_squad(str(shared_data / "squad" / "dev-v1.1.json.gz"))
  inputs, targets = tt.squad_to_text(data.examples)
  ex = data.examples[0]
  assert inputs[0] == f"question: {ex.question} context: {ex.paragraph.context}"
  assert targets[0] == ex.answers[0]
  got = tt.squad_metrics(data, targets)
  assert got["exact"] == 100.0 and got["f1"] == 100.0 and got["missing"] == 0
  wrong = tt.squad_metrics(data, ["zzz"] * len(targets))
  assert wrong["exact"] == 0.0


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------

def test_features_follow_the_batch_contract(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.num_extra_ids) == (0, 1, 100)
  inputs = ["the class statement", "sst2 sentence: " + "word " * 40]
  assert len(tokenizer.tokenize(inputs[0]).numpy()) < 15  # fits with its EOS
  targets = ["positive", "negative"]
  feats = tt.make_features(inputs, targets, tokenizer, max_input_length=16, max_target_length=8)
  a = feats.arrays
  assert set(a) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                    "decoder_loss_weights"}
  assert a["encoder_input_tokens"].shape == (2, 16) and a["encoder_input_tokens"].dtype == np.int32
  assert feats.num_truncated_inputs == 1 and feats.num_truncated_targets == 0
  assert a["encoder_input_tokens"][1, -1] == EOS  # EOS kept after truncation
  target_ids = tokenizer.tokenize("positive").numpy().tolist()
  n = len(target_ids) + 1
  assert a["decoder_target_tokens"][0, :n].tolist() == target_ids + [EOS]
  assert not a["decoder_target_tokens"][0, n:].any()
  assert a["decoder_input_tokens"][0, :n].tolist() == [0] + target_ids
  assert a["decoder_loss_weights"][0].tolist() == [1.0] * n + [0.0] * (a[
      "decoder_target_tokens"].shape[1] - n)
  assert tt.ids_to_texts(tokenizer, a["decoder_target_tokens"]) == targets
  assert tt.ids_to_texts(tokenizer, a["encoder_input_tokens"][:1]) == inputs[:1]
  assert set(tt.make_features(inputs, None, tokenizer).arrays) == {"encoder_input_tokens"}
  fixed = tt.make_features(inputs, targets, tokenizer, max_input_length=64, max_target_length=24,
                           multiple=None).arrays
  assert fixed["encoder_input_tokens"].shape == (2, 64)
  assert fixed["decoder_target_tokens"].shape == (2, 24)
  dynamic = tt.make_features(inputs, targets, tokenizer, max_input_length=64,
                             max_target_length=24).arrays
  assert dynamic["decoder_target_tokens"].shape == (2, 8)  # longest target, rounded up to 8
  with pytest.raises(ValueError, match="targets are None"):
    tt.make_features(inputs, ["positive", None], tokenizer)
  # Ids past the tokenizer's vocabulary (padded embeddings) decode as unknown, not a crash.
  assert tt.ids_to_texts(tokenizer, np.array([[tokenizer.vocab_size + 5, EOS]]))[0] != ""


# ----------------------------------------------------------------------------
# A tiny fine-tune
# ----------------------------------------------------------------------------

_SENTENCES = [
    ("a warm , funny and moving film", "1"), ("dull , lifeless and far too long", "0"),
    ("the best picture of the year", "1"), ("an ugly , pointless mess", "0"),
    ("charming performances all round", "1"), ("the plot makes no sense at all", "0"),
    ("a small gem worth seeing twice", "1"), ("boring from start to finish", "0"),
]


def test_few_steps_of_training_teach_greedy_decoding_the_labels(tokenizer):
  examples = [glue.GlueExample(f"mem:{i}", i, s, None, y) for i, (s, y) in enumerate(_SENTENCES)]
  inputs, targets = tt.glue_to_text("sst2", examples)
  batch = tt.make_features(inputs, targets, tokenizer, max_input_length=32,
                           max_target_length=8).arrays
  model = t5.T5Model(t5.T5Config.preset("t5_v1_1_tiny", vocab_size=tokenizer.vocab_size))
  params = _init(model, batch["encoder_input_tokens"], batch["decoder_input_tokens"].shape[1])
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"])
      return losses.seq2seq_loss(logits, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"])[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Batches of 3: the last one is padded with empty rows.
  decode = functools.partial(tt.predict_texts, model, tokenizer=tokenizer,
                             encoder_input_tokens=batch["encoder_input_tokens"], batch_size=3,
                             max_decode_length=6)
  before = decode(params)
  history = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    history.append(float(loss))
  assert history[-1] < 0.05 * history[0], history
  texts = decode(params)
  assert texts == targets and before != targets
  assert tt.glue_metrics("sst2", texts, examples)["accuracy"] == 1.0
