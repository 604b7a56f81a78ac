"""PET cloze few-shot classification (tasks/cloze.py, configs/pet.py).

A tiny WordPiece vocabulary and a tiny SST-2-like TSV are written here; the
MLM checkpoint is a random Hugging Face BertForMaskedLM folder, so the MLM
head's loading is checked against transformers' own logits.
"""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from bert_jax import finetune
from bert_jax import steps
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError
from bert_jax.tasks import cloze
from conftest import random_hf_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("a an the it was is this film movie story plot acting great terrible good bad fun "
         "dull boring lovely awful yes no maybe not very quite and but of , . ? ! ##ness "
         "##ly").split()
POSITIVE = ["a lovely film", "very good acting", "the story is fun", "great fun and lovely",
            "quite a good movie", "this film is great", "lovely acting", "good story"]
NEGATIVE = ["a dull film", "very bad acting", "the plot is boring", "awful and dull",
            "quite a bad movie", "this film is terrible", "boring acting", "bad plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """vocab.txt and an SST-2 folder (train: 8 + 8 rows; dev: 8 rows)."""
  root = tmp_path_factory.mktemp("cloze")
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n",
                   encoding="utf-8")
  (root / "SST-2").mkdir()
  rows = [(s, 1) for s in POSITIVE] + [(s, 0) for s in NEGATIVE]
  (root / "SST-2" / "train.tsv").write_text(
      "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")
  (root / "SST-2" / "dev.tsv").write_text(
      "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[::2]), encoding="utf-8")
  return root, vocab


@pytest.fixture(scope="module")
def tokenizer(files):
  return tokenizer_lib.load_tokenizer(str(files[1]), lower_case=True)


@pytest.fixture(scope="module")
def hf_folder(files):
  """A random transformers BertForMaskedLM saved as a Hugging Face folder."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64)).eval()
  return random_hf_folder(model, files[0] / "hf_mlm")


def _pet_config(name="sst2"):
  spec = importlib.util.spec_from_file_location("pet", ROOT / "configs" / "pet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)


def _config(files, folder, **fields):
  config = _pet_config()
  config.update_from_flattened_dict({
      "init_from": str(folder), "data.data_dir": str(files[0]),
      "data.tokenizer": str(files[1]), "data.max_length": 32, "cloze.k_per_class": 4,
      "train.num_epochs": 2, "eval.batch_size": 8, "log.every_steps": 1,
      "log.progress": False, "optim.learning_rate": 1e-3, **fields})
  return config


# ------------------------------------------------------------------ patterns


def test_pattern_rendering_and_truncation_keep_the_mask(tokenizer):
  pattern = cloze.parse_pattern("{text_a} It was {mask}.", is_pair=False)
  literals = {"It was": tokenizer.tokenize("It was").numpy(),
              ".": tokenizer.tokenize(".").numpy()}
  text = {"text_a": tokenizer.tokenize("the film was very very dull and boring").numpy()}
  ids = lambda s: [WORDS.index(w) + 5 for w in s.split()]
  full = cloze.render(pattern, text, literals, tokenizer, mask_id=4, num_masks=1,
                      max_length=32)
  assert list(full["encoder_input_tokens"]) == (
      [2] + ids("the film was very very dull and boring it was") + [4] + ids(".") + [3])
  assert list(full["mlm_positions"]) == [11]
  # Cut to 8 tokens: the text loses its tail; the pattern's words and the mask stay.
  cut = cloze.render(pattern, text, literals, tokenizer, mask_id=4, num_masks=1, max_length=8)
  assert list(cut["encoder_input_tokens"]) == [2] + ids("the film it was") + [4] + ids(".") + [3]
  assert cut["encoder_input_tokens"][cut["mlm_positions"][0]] == 4
  with pytest.raises(ConfigError, match="config.data.max_length: 6 leaves 0 tokens"):
    cloze.render(pattern, text, literals, tokenizer, mask_id=4, num_masks=1, max_length=6)

  # Pair with a segment break and two masks: the longer text is cut first.
  pair = cloze.parse_pattern("{text_a} ? {sep} {mask} , {text_b}", is_pair=True)
  texts = {"text_a": np.array(ids("a good film")),
           "text_b": np.array(ids("this movie is very very dull"))}
  out = cloze.render(pair, texts, {"?": ids("?"), ",": ids(",")}, tokenizer, mask_id=4,
                     num_masks=2, max_length=14)
  assert list(out["encoder_input_tokens"]) == (
      [2] + ids("a good film ?") + [3, 4, 4] + ids(", this movie is very") + [3])
  assert list(out["encoder_type_ids"]) == [0] * 6 + [1] * 8
  assert list(out["mlm_positions"]) == [6, 7]


def test_pattern_errors_name_the_key():
  with pytest.raises(ConfigError, match=r"^config.cloze.pattern: unknown placeholder "
                     r"\{sentence\}"):
    cloze.parse_pattern("{sentence} It was {mask}.", is_pair=False)
  with pytest.raises(ConfigError, match=r"config.cloze.pattern: .* has \{mask\} 0 times"):
    cloze.parse_pattern("{text_a} It was great.", is_pair=False)
  with pytest.raises(ConfigError, match=r"has \{text_b\} 1 times; a single-sentence task"):
    cloze.parse_pattern("{text_a} {mask} {text_b}", is_pair=False)
  with pytest.raises(ConfigError, match=r"has \{text_b\} 0 times; a pair task needs 1"):
    cloze.parse_pattern("{text_a} {mask}", is_pair=True)


# --------------------------------------------------------------- verbalizers


def test_verbalizer_parsing_and_errors(tokenizer):
  words = cloze.parse_verbalizer("1=great|good, 0=terrible", ("0", "1"))
  assert words == (("terrible",), ("great", "good"))
  v = cloze.make_verbalizer(words, tokenizer, single_token=True)
  great, good, terrible = (WORDS.index(w) + 5 for w in ("great", "good", "terrible"))
  np.testing.assert_array_equal(v.ids[:, :, 0], [[terrible, 0], [great, good]])
  np.testing.assert_array_equal(v.word_mask, [[1, 0], [1, 1]])
  for text, message in [("0=bad", r"no word for label\(s\) \['1'\]"),
                        ("0=bad,2=good", "unknown label '2'; the task's labels are"),
                        ("0=bad,1", "entry '1' .* is not 'label=word'"),
                        ("0=bad,0=dull,1=good", "label '0' given twice")]:
    with pytest.raises(ConfigError, match="^config.cloze.verbalizer: " + message):
      cloze.parse_verbalizer(text, ("0", "1"))
  with pytest.raises(ConfigError, match=r"^config.cloze.verbalizer: word 'greatness' is 2 "
                     r"tokens \['great', '##ness'\] .* not a single token"):
    cloze.make_verbalizer((("bad",), ("greatness",)), tokenizer, single_token=True)
  with pytest.raises(ConfigError, match="word 'superb' is not in the vocabulary"):
    cloze.make_verbalizer((("bad",), ("superb",)), tokenizer, single_token=True)
  multi = cloze.make_verbalizer((("bad",), ("greatness",)), tokenizer, single_token=False)
  assert multi.num_masks == 2 and multi.token_mask.tolist() == [[[1, 0]], [[1, 1]]]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_the_softmax_restricted_to_the_verbalizer(tokenizer):
  rng = np.random.RandomState(0)
  logits = rng.normal(size=(4, 1, 40)).astype(np.float32) * 3  # [batch, masks, vocab]
  labels = np.array([1, 0, 1, -1])  # the last row is a filler (weight 0)
  weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
  v = cloze.make_verbalizer((("terrible",), ("great",)), tokenizer, single_token=True)
  loss, metrics = cloze.cloze_loss(logits, labels, weights, v)
  # PET: softmax over the verbalizer tokens' raw logits alone.
  z = logits[:3, 0][:, v.ids[:, 0, 0]]  # [3, labels]
  expected = -np.mean(_log_softmax(z)[np.arange(3), labels[:3]])
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["cloze/count"]) == 3
  assert float(metrics["cloze/correct"]) == np.sum(z.argmax(-1) == labels[:3])

  # Several words average their scores; a multi-token word averages its tokens' log-probs.
  logits2 = rng.normal(size=(2, 2, 40)).astype(np.float32)
  v2 = cloze.make_verbalizer((("bad", "dull"), ("greatness",)), tokenizer, single_token=False)
  lp = _log_softmax(logits2)
  bad, dull, great, ness = (WORDS.index(w) + 5 for w in ("bad", "dull", "great", "##ness"))
  scores = np.stack([(lp[:, 0, bad] + lp[:, 0, dull]) / 2,
                     (lp[:, 0, great] + lp[:, 1, ness]) / 2], -1)
  np.testing.assert_allclose(cloze.label_scores(logits2, v2), scores, rtol=1e-5)


# ------------------------------------------------------------------ few-shot


def test_k_per_class_sampling_is_seeded_balanced_and_deterministic():
  labels = ["0", "1", "1", "2"] * 10 + ["1"] * 5
  a = cloze.few_shot_indices(labels, ("0", "1", "2"), 4, seed=3)
  assert len(a) == 12 and list(a) == sorted(a)
  assert [sum(labels[i] == n for i in a) for n in "012"] == [4, 4, 4]
  np.testing.assert_array_equal(a, cloze.few_shot_indices(labels, ("0", "1", "2"), 4, seed=3))
  assert not np.array_equal(a, cloze.few_shot_indices(labels, ("0", "1", "2"), 4, seed=4))
  with pytest.raises(ConfigError, match="config.cloze.k_per_class: label '0' has 10 training "
                     "examples, fewer than 11"):
    cloze.few_shot_indices(labels, ("0", "1", "2"), 11, seed=0)


# --------------------------------------------------------------- fine-tuning


def test_mlm_head_is_loaded_from_the_hf_folder(files, hf_folder):
  import torch  # pylint: disable=import-outside-toplevel
  reference, folder = hf_folder
  config = _config(files, folder)
  run = finetune._setup(config)
  assert run.task.model_task == "mlm" and "mlm" in run.pretrained
  _, shardings = steps.abstract_sharded_state(run.model, optax.identity(), run.init_shapes,
                                              run.mesh, run.rules)
  params = finetune._initial_state(config, run, optax.identity(), shardings.params).params
  split = run.task.load("dev", 0)
  batch = run.task.pad(split.features, 8)
  outputs = jax.jit(lambda p, b: run.model.apply({"params": p}, **b))(
      params, steps.model_inputs(run.model, batch))
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(batch["encoder_input_tokens"]),
                       token_type_ids=torch.tensor(batch["encoder_type_ids"]),
                       attention_mask=torch.tensor(batch["encoder_input_tokens"] != 0)
                       ).logits.numpy()
  at_mask = theirs[np.arange(8), batch["mlm_positions"][:, 0]]  # [batch, vocab]
  np.testing.assert_allclose(np.asarray(outputs["mlm_logits"])[:, 0], at_mask, atol=1e-4)
  scores = run.task.predict_outputs(outputs, batch)["logits"]
  np.testing.assert_allclose(scores, _log_softmax(at_mask)[:, run.task.verbalizer.ids[:, 0, 0]],
                             atol=1e-4)


def test_cloze_finetunes_on_k_per_class_and_cls_reads_the_same_subset(files, hf_folder,
                                                                      tmp_path):
  config = _config(files, hf_folder[1], **{"cloze.k_per_class": 8, "train.num_epochs": 1})
  out = finetune.finetune(config, str(tmp_path))
  assert 0.0 <= out["eval/dev/accuracy"] <= 1.0
  assert out["best"]["metric"] == "dev/accuracy"
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/cloze/loss" in r]
  assert [r["step"] for r in train] == [1, 2]  # 16 examples, batch 8
  assert all(np.isfinite(r["train/cloze/loss"]) and r["train/cloze/count"] == 8 for r in train)
  # The [CLS] baseline: a classifier model on the same examples, without the MLM head.
  cls = finetune._setup(_config(files, hf_folder[1], **{"cloze.head": "cls",
                                                        "cloze.k_per_class": 8}))
  assert cls.task.model_task == "sequence_classification" and "mlm" not in cls.pretrained
  pet = finetune._setup(config)
  texts = lambda run: [e.text_a for e in run.task.load("train", 0).examples]
  assert texts(cls) == texts(pet) and len(texts(pet)) == 16
  assert "mlm_positions" not in cls.task.load("train", 0).features[0]


def test_a_checkpoint_without_an_mlm_head_is_a_one_line_error(files, tmp_path):
  transformers = pytest.importorskip("transformers")
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64))
  model.save_pretrained(tmp_path / "encoder_only")
  with pytest.raises(ConfigError, match=r"^config.init_from: \S+ has no MLM head, which the "
                     "cloze task reads") as e:
    finetune._setup(_config(files, tmp_path / "encoder_only"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="config.cloze.head: unknown head 'pooled'"):
    finetune._setup(_config(files, tmp_path / "encoder_only", **{"cloze.head": "pooled"}))
