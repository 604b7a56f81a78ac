"""BART on GLUE through its sequence-classification head (finetune.head), T5 still as text.

A random transformers BartForConditionalGeneration saved with a RoBERTa-layout
vocab.json + merges.txt is fine-tuned for two epochs on a tiny SST-2-like TSV
with configs/glue.py: the run trains GlueTask's classification loss on
BartForSequenceClassification (the head starts fresh), reports accuracy, and
its best checkpoint re-evaluates to the same score and exports to a folder
that transformers' BartForSequenceClassification loads with the same logits
(and AutoTokenizer with the same pieces), which restarts in bert_jax as
classification with its head.
"""
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

import bert_jax
from bert_jax import finetune
from bert_jax import models
from bert_jax import steps
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.defaults import ConfigError
from bert_jax.tasks import adapters
from conftest import random_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROWS = [("a fine film .", 1), ("the worst plot .", 0), ("good and warm .", 1),
        ("dull , flat , long .", 0)] * 4


def _tiny_bpe(folder: pathlib.Path) -> int:
  """vocab.json + merges.txt: <s> <pad> </s> <unk>, the 256 byte symbols, two merges."""
  from bert_jax.data import bpe  # pylint: disable=import-outside-toplevel
  pieces = ["<s>", "<pad>", "</s>", "<unk>"] + list(bpe.bytes_to_unicode().values())
  pieces += ["\u0120t", "he", "<mask>"]
  (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}),
                                     encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n\u0120 t\nh e\n", encoding="utf-8")
  return len(pieces)


def _glue_config(name: str = "sst2"):
  root = pathlib.Path(__file__).resolve().parents[1]
  sys.path.insert(0, str(root / "configs"))
  try:
    import glue as glue_config  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return glue_config.get_config(name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(HF BART folder with its BPE files, GLUE data folder)."""
  root = tmp_path_factory.mktemp("bart_glue")
  folder = root / "bart"
  folder.mkdir()
  vocab = _tiny_bpe(folder)
  torch.manual_seed(0)
  hf_config = transformers.BartConfig(
      vocab_size=math.ceil(vocab / 8) * 8, d_model=32, encoder_layers=2, decoder_layers=1,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
      decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
  random_hf_folder(transformers.BartForConditionalGeneration(hf_config).eval(), folder)
  data = root / "glue" / "SST-2"
  data.mkdir(parents=True)
  for split in ("train", "dev"):
    (data / f"{split}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS), encoding="utf-8")
  return folder, root / "glue"


def _config(setup, **fields):
  folder, data = setup
  config = _glue_config()
  config.family = "bart"
  config.update_from_flattened_dict({
      "init_from": str(folder), "data.data_dir": str(data), "data.max_length": 24,
      "data.padding": "max",  # one shape: one compile "train.batch_size": 8, "eval.batch_size": 8,
      "train.num_epochs": 2, "train.warmup_fraction": 0.0, "optim.learning_rate": 3e-3,
      "log.every_steps": 1, "log.progress": False, **fields})
  return config


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
  """A two-epoch GLUE run: (config, workdir, finetune's result)."""
  config = _config(setup)
  workdir = tmp_path_factory.mktemp("bart_run")
  return config, workdir, finetune.finetune(config, str(workdir))


def test_glue_trains_the_classification_head(run):
  config, workdir, out = run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) >= 2 and all(np.isfinite(losses)), losses
  assert 0.0 <= out["eval/dev/accuracy"] <= 1.0
  assert not any("num_unparseable" in k for k in out)  # scored from logits, not texts
  assert out["best"]["metric"] == "dev/accuracy"
  built = finetune._setup(config)
  assert isinstance(built.task, adapters.GlueTask)
  assert type(built.model).__name__ == "BartForSequenceClassification"
  assert built.model.num_labels == 2


def test_best_checkpoint_reevaluates_and_exports_to_transformers(setup, run, tmp_path):
  config, workdir, out = run
  scores = finetune.evaluate(config, str(workdir))
  assert scores["dev/accuracy"] == pytest.approx(out["best"]["value"])

  built = finetune._setup(config)
  params, _, _ = finetune._restore_best(config, built, str(workdir))
  tokenizer = tokenizer_lib.load_tokenizer(config.init_from, lower_case=True)
  split = built.task.load("dev", 8)
  batch = built.task.pad(split.features, 8)
  ours = np.asarray(built.model.apply({"params": jax.device_get(params)},
                                      **steps.model_inputs(built.model, batch))["logits"])

  path = finetune.export(config, str(workdir), str(tmp_path / "export"))
  saved = json.loads((pathlib.Path(path) / "config.json").read_text())
  assert saved["architectures"] == ["BartForSequenceClassification"]
  hf = transformers.BartForSequenceClassification.from_pretrained(path).eval()
  ids = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  with torch.no_grad():
    theirs = hf(input_ids=ids, attention_mask=(ids != tokenizer.pad_id).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  model, reloaded = bert_jax.from_pretrained(path)
  again = model.apply({"params": reloaded}, **steps.model_inputs(model, batch))["logits"]
  np.testing.assert_allclose(np.asarray(again), ours, atol=1e-5)

  # The byte-level BPE files come along: transformers' AutoTokenizer reads the folder
  # and tokenizes as ours does (<s> ... </s> around the same pieces).
  assert {"vocab.json", "merges.txt"} <= {p.name for p in pathlib.Path(path).iterdir()}
  theirs_tok = transformers.AutoTokenizer.from_pretrained(path)
  text = "the tea , the heat ."
  assert theirs_tok(text).input_ids[1:-1] == tokenizer.tokenize([text]).to_list()[0]
  assert theirs_tok.pad_token_id == tokenizer.pad_id

  # Fine-tuning from the exported folder restarts as classification, head included.
  again_run = finetune._setup(_config(setup, init_from=path))
  assert type(again_run.model).__name__ == "BartForSequenceClassification"
  head = again_run.pretrained["classification_head"]
  jax.tree.map(np.testing.assert_array_equal, head, reloaded["classification_head"])


def test_heads_per_family_and_switch(setup):
  """BART: GLUE classifies by default, text-to-text on request and for NER/SQuAD; T5
  stays text-to-text; impossible choices fail in one line naming finetune.head."""
  tokenizer = tokenizer_lib.load_tokenizer(str(setup[0]), lower_case=True)
  assert adapters.output_head(_config(setup)) == "classification"
  t2t = adapters.make_task(_config(setup, **{"finetune.head": "text2text"}), tokenizer)
  assert isinstance(t2t, adapters.Text2TextTask)
  for task in ("conll", "squad"):
    assert adapters.output_head(_config(setup, task=task)) == "text2text"
  t5 = _config(setup, family="t5")
  assert adapters.output_head(t5) == "text2text"
  assert isinstance(adapters.make_task(t5, tokenizer), adapters.Text2TextTask)
  assert adapters.output_head(_config(setup, family="bert")) == "classification"
  assert not models.get("bert").encoder_decoder
  bad = [({"family": "t5", "finetune.head": "classification"}, "finetune.head", "no class"),
         ({"task": "conll", "finetune.head": "classification"}, "finetune.head", "serves"),
         ({"family": "bert", "finetune.head": "text2text"}, "finetune.head", "encoder-dec"),
         ({"finetune.head": "seq2seq"}, "finetune.head", "unknown head"),
         ({"finetune.head": "text2text", "finetune.method": "prompt"}, "finetune.method",
          "text-to-text"),
         ({"task": "sbert"}, "task", "'bart' is an encoder-decoder"),
         ({"task": "cloze", "family": "t5"}, "task", "'t5' is an encoder-decoder")]
  for fields, key, words in bad:
    with pytest.raises(ConfigError, match=f"^config.{key}: .*{words}") as e:
      adapters.make_task(_config(setup, **fields), tokenizer)
    assert "\n" not in str(e.value)
