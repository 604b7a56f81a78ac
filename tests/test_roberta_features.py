"""RoBERTa fine-tuning features: GLUE, CoNLL and SQuAD with the byte-level BPE, padding id 1.

Hugging Face's RobertaTokenizer (on a BPE vocabulary trained here with the
`tokenizers` package, RoBERTa's special-token layout) is the reference for
the layouts; a tiny random RobertaForSequenceClassification (PyTorch) proves
that a batch built by our features and pad_batch(pad_id=1) gives the logits
PyTorch gives each example alone, i.e. padding and positions are right.
"""
import json

import numpy as np
import pytest

import bert_jax
from bert_jax import defaults
from bert_jax.data import bpe
from bert_jax.data import tokenizer as tok_lib
from bert_jax.tasks import batching
from bert_jax.tasks import glue
from bert_jax.tasks import ner
from bert_jax.tasks import squad
from conftest import python_docstring_lines, train_roberta_bpe

transformers = pytest.importorskip("transformers")

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("Stocks fell sharply on Monday, traders said.", "Markets dropped."),
    ("Héllo wörld — naïve café!", "中文 and emoji 😀 too"),
    ("Short.", "A considerably longer second sentence, with commas, numbers like 1,000 "
               "and 3.14, and several clauses that go on and on."),
    ("don't stop", "we'll see"),
]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
  """vocab.json + merges.txt in RoBERTa's layout (<s> <pad> </s> <unk> ... <mask>)."""
  corpus = python_docstring_lines(
      ("os", "re", "json", "collections", "argparse", "unittest", "logging", "subprocess",
       "threading", "pathlib", "functools", "itertools", "decimal"))
  return train_roberta_bpe(tmp_path_factory.mktemp("roberta_bpe"), corpus, 1500)


@pytest.fixture(scope="module")
def tok(bpe_folder):
  return tok_lib.load_tokenizer(str(bpe_folder))


def _hf(folder, **kwargs):
  return transformers.RobertaTokenizer(vocab=str(folder / "vocab.json"),
                                       merges=str(folder / "merges.txt"), **kwargs)


def _examples(pairs):
  return [glue.GlueExample(f"hand:{i}", i, a, b, str(i % 2)) for i, (a, b) in enumerate(pairs)]


# ----------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------

def test_glue_pairs_are_roberta_layout(tok, bpe_folder):
  hf = _hf(bpe_folder)
  feats = glue.encode_examples(_examples(PAIRS), tok, "mrpc", max_length=128)
  for f, (a, b) in zip(feats, PAIRS):
    assert f["encoder_input_tokens"].tolist() == hf(a, b)["input_ids"]
    assert not f["encoder_type_ids"].any()  # RoBERTa has one token type
  tokens = feats[0]["encoder_input_tokens"]
  n_a = len(tok.encode(PAIRS[0][0]))
  assert tokens[0] == tok.cls_id and tokens[n_a + 1] == tokens[n_a + 2] == tok.sep_id
  single = glue.encode_examples(_examples(PAIRS), tok, "sst2", max_length=128)
  assert [f["encoder_input_tokens"].tolist() for f in single] == [
      hf(a)["input_ids"] for a, _ in PAIRS]


def test_glue_truncation_leaves_four_special_tokens(tok):
  feats = glue.encode_examples(_examples(PAIRS[3:4]), tok, "mrpc", max_length=16)
  tokens = feats[0]["encoder_input_tokens"]
  assert len(tokens) == 16
  a = tok.encode(PAIRS[3][0])
  assert tokens[:len(a) + 3].tolist() == [tok.cls_id, *a, tok.sep_id, tok.sep_id]
  assert tokens[-1] == tok.sep_id and tok.sep_id not in tokens[len(a) + 3:-1]
  with pytest.raises(ValueError, match="4 special"):
    glue.encode_examples(_examples(PAIRS[:1]), tok, "mrpc", max_length=4)


def test_mrpc_dev_matches_hugging_face(tok, bpe_folder, shared_data):
  examples = glue.read_tsv(str(shared_data / "mrpc"), "mrpc", "dev")
  hf = _hf(bpe_folder)
  feats = glue.encode_examples(examples, tok, "mrpc", max_length=512)
  expected = hf([e.text_a for e in examples], [e.text_b for e in examples])["input_ids"]
  assert [f["encoder_input_tokens"].tolist() for f in feats] == expected


def test_pad_batch_pads_with_the_tokenizer_pad_id(tok):
  feats = glue.encode_examples(_examples(PAIRS), tok, "mrpc", max_length=128)
  batch = batching.pad_batch(feats, multiple=8, batch_size=6, pad_id=tok.pad_id)
  lengths = [len(f["encoder_input_tokens"]) for f in feats]
  tokens = batch["encoder_input_tokens"]
  assert tokens.shape == (6, -(-max(lengths) // 8) * 8)
  for row, n in enumerate(lengths):
    assert (tokens[row, n:] == 1).all() and (tokens[row, :n] != 1).all()
  assert (tokens[5] == 1).all()  # the filler row
  assert not batch["encoder_type_ids"].any()
  assert batch["classifier_weights"].tolist() == [1, 1, 1, 1, 1, 0]
  # The default stays the batch contract's 0.
  assert (batching.pad_batch(feats)["encoder_input_tokens"][0, lengths[0]:] == 0).all()


# ----------------------------------------------------------------------------
# CoNLL NER
# ----------------------------------------------------------------------------

def test_conll_words_match_hugging_face_split_words(tok, bpe_folder, shared_data):
  """Each word with a leading space: HF's is_split_into_words + add_prefix_space=True."""
  data = ner.read_conll(str(shared_data / "conll2003" / "valid.txt.gz"))
  sentences = data.sentences[:300]
  names = ner.label_names_of(data.sentences)
  out = ner.encode_sentences(sentences, tok, names, max_length=512)
  assert out.num_truncated_words == 0
  hf = _hf(bpe_folder, add_prefix_space=True)
  for s, f, positions in zip(sentences, out.features, out.word_positions):
    enc = hf(list(s.words), is_split_into_words=True)
    assert f["encoder_input_tokens"].tolist() == enc["input_ids"], s.source
    word_ids = enc.word_ids()
    first = [word_ids.index(w) for w in range(len(s.words))]
    assert positions.tolist() == first, s.source
    labelled = np.flatnonzero(f["token_labels"] != ner.IGNORE_LABEL)
    assert labelled.tolist() == first
  assert sum(len(f["encoder_input_tokens"]) - 2 for f in out.features) > 1.2 * sum(
      len(s.words) for s in sentences)  # words really are cut into pieces


# ----------------------------------------------------------------------------
# SQuAD
# ----------------------------------------------------------------------------

def test_squad_windows_roberta_layout_and_labels(tok, bpe_folder, shared_data):
  data = squad.read_squad(str(shared_data / "squad" / "dev-v1.1.json.gz"))
  examples = data.examples[:60]
  feats = squad.make_features(examples, tok, max_seq_length=192, doc_stride=64,
                              max_query_length=48, training=True)
  b = feats.batch
  assert len(feats) > len(examples)  # long contexts really are windowed
  assert not b["encoder_type_ids"].any()
  hf = _hf(bpe_folder, add_prefix_space=True)
  exact = labelled = 0
  for i in range(len(feats)):
    ex = examples[feats.example_index[i]]
    tokens = b["encoder_input_tokens"][i]
    n = int(np.sum(tokens != tok.pad_id))
    assert (tokens[n:] == tok.pad_id).all() and tokens[n - 1] == tok.sep_id
    query = tok.encode(ex.question)[:48]
    assert tokens[:len(query) + 3].tolist() == [tok.cls_id, *query, tok.sep_id, tok.sep_id]
    doc = np.flatnonzero(feats.token_to_orig[i] >= 0)
    assert doc[0] == len(query) + 3 and doc[-1] == n - 2
    # The doc tokens are a slice of Hugging Face's for the context words
    # joined by spaces; the first window of an example starts it.
    full = hf(" ".join(ex.paragraph.words), add_special_tokens=False)["input_ids"]
    window = tokens[doc].tolist()
    first = i == 0 or feats.example_index[i - 1] != feats.example_index[i]
    starts = [0] if first else range(len(full) - len(window) + 1)
    assert any(full[k:k + len(window)] == window for k in starts), i
    s, e = b["start_positions"][i], b["end_positions"][i]
    if s:
      labelled += 1
      text = tok.decode(tokens[s:e + 1]).strip()
      assert ex.label_text in text, (text, ex.label_text)
      exact += text == ex.label_text
  assert labelled >= 60 and exact >= 0.9 * labelled, (exact, labelled)


def test_squad_rejects_query_length_without_room_for_four_specials(tok):
  with pytest.raises(ValueError, match="4 special tokens"):
    squad.make_features([], tok, max_seq_length=20, max_query_length=16)


# ----------------------------------------------------------------------------
# End to end: a RoBERTa checkpoint folder, our features, PyTorch's logits
# ----------------------------------------------------------------------------

def test_roberta_checkpoint_logits_match_torch_on_padded_batch(tok, bpe_folder, tmp_path):
  torch = pytest.importorskip("torch")
  config = transformers.RobertaConfig(
      vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
      bos_token_id=0, eos_token_id=2, num_labels=2,
      initializer_range=0.3)  # logits of order 1, so a wrong position shows
  torch.manual_seed(0)
  reference = transformers.RobertaForSequenceClassification(config).eval()
  folder = tmp_path / "roberta"
  reference.save_pretrained(folder)
  for name in (bpe.VOCAB_FILE, bpe.MERGES_FILE):
    (folder / name).write_bytes((bpe_folder / name).read_bytes())

  # What `finetune --config.init_from=<folder>` loads: tokenizer and model.
  tokenizer = tok_lib.load_tokenizer(str(folder))
  assert isinstance(tokenizer, bpe.BpeTokenizer)
  model, params = bert_jax.from_pretrained(folder)
  assert model.config.pad_token_id == tokenizer.pad_id == 1

  feats = glue.encode_examples(_examples(PAIRS), tokenizer, "mrpc", max_length=128)
  batch = batching.pad_batch(feats, multiple=8, pad_id=tokenizer.pad_id)
  tokens = batch["encoder_input_tokens"]
  assert (tokens == 1).sum() > 20  # really padded
  ours = np.asarray(model.apply({"params": params}, tokens,
                                encoder_type_ids=batch["encoder_type_ids"])["logits"])
  with torch.no_grad():
    alone = np.concatenate([
        reference(input_ids=torch.tensor(f["encoder_input_tokens"][None].astype(np.int64))
                  ).logits.numpy() for f in feats])
  np.testing.assert_allclose(ours, alone, rtol=1e-4, atol=1e-5)
  assert np.abs(alone).max() > 0.1 and np.abs(alone[0] - alone[1]).max() > 0.01
  # Padding with the batch contract's 0 (RoBERTa's <s>) would be read as text.
  wrong = batching.pad_batch(feats, multiple=8)["encoder_input_tokens"]
  wrong_logits = np.asarray(model.apply({"params": params}, wrong)["logits"])
  assert np.abs(wrong_logits - alone).max() > 0.01


# ----------------------------------------------------------------------------
# Fine-tuning a RoBERTa folder end to end
# ----------------------------------------------------------------------------

def _roberta_folder(bpe_folder, tmp_path, tok, architecture):
  torch = pytest.importorskip("torch")
  config = transformers.RobertaConfig(
      vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=200, type_vocab_size=1, pad_token_id=1,
      bos_token_id=0, eos_token_id=2)
  torch.manual_seed(0)
  folder = tmp_path / "roberta"
  getattr(transformers, architecture)(config).save_pretrained(folder)
  for name in (bpe.VOCAB_FILE, bpe.MERGES_FILE):
    (folder / name).write_bytes((bpe_folder / name).read_bytes())
  return folder


@pytest.mark.slow
def test_finetune_squad_from_roberta_folder(tok, bpe_folder, tmp_path, shared_data):
  """`finetune` from a RoBERTa folder: pad id 1, filler rows weigh 0, the loss falls."""
  from bert_jax import finetune  # pylint: disable=import-outside-toplevel
  from bert_jax.tasks import adapters  # pylint: disable=import-outside-toplevel
  folder = _roberta_folder(bpe_folder, tmp_path, tok, "RobertaForQuestionAnswering")
  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "task": "squad", "init_from": str(folder), "data.data_dir": str(shared_data / "squad"),
      "data.train_split": "dev-v1.1.json", "data.eval_splits": "dev-v1.1.json",
      "data.max_train_examples": 8, "data.max_eval_examples": 8, "data.max_length": 192,
      "data.doc_stride": 64, "data.padding": "max", "train.batch_size": 8,
      "eval.batch_size": 8, "train.num_epochs": 4, "optim.learning_rate": 3e-3,
      "log.every_steps": 1, "log.progress": False, "checkpoint.every_epochs": 100})

  run = finetune._setup(config)  # pylint: disable=protected-access
  assert run.tokenizer.pad_id == run.model.config.pad_token_id == 1
  split = run.task.load("dev-v1.1.json", 3)
  batch = run.task.pad(split.features[:3], 8)
  assert (batch["encoder_input_tokens"][3:] == 1).all()  # filler rows are <pad>, not <s>
  np.testing.assert_array_equal(batch["example_weights"], [1, 1, 1, 0, 0, 0, 0, 0])
  assert isinstance(run.task, adapters.SquadTask)

  workdir = tmp_path / "run"
  out = finetune.finetune(config, str(workdir))
  losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").open()
            if '"loss"' in line]
  assert len(losses) >= 4 and losses[-1] < losses[0], losses
  assert 0.0 <= out["eval/dev-v1.1.json/f1"] <= 100.0

  # A WordPiece vocabulary (pad 0) cannot drive a RoBERTa model (pad 1).
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]) + "\n")
  config.data.tokenizer = str(vocab)
  with pytest.raises(ValueError, match="pads with id 0 but the model's pad_token_id is 1"):
    finetune._setup(config)  # pylint: disable=protected-access
