"""CoNLL and SQuAD fine-tuning from random Hugging Face DeBERTa-v2 and ModernBERT folders.

GLUE from each family is tested in its own file (test_deberta.py, test_modernbert.py);
here the token-classification and span (question answering) heads: a transformers
*ForMaskedLM folder with a WordPiece vocab.txt goes through `bert-jax finetune`, the
encoder carries over, the fresh head trains (the loss falls), the dev metric is
reported and `predict` writes the task's file.
"""
import json
import pathlib
import re

import numpy as np
import pytest

from bert_jax import defaults
from bert_jax import finetune
from bert_jax.tasks import ner
from bert_jax.tasks import squad

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _hf_folder(family: str, folder: pathlib.Path, texts) -> pathlib.Path:
  """A random transformers MLM model of `family` and a vocab.txt of every word in texts."""
  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
  folder.mkdir()
  (folder / "vocab.txt").write_text("\n".join(_SPECIALS + words) + "\n", encoding="utf-8")
  vocab = len(_SPECIALS) + len(words)
  torch.manual_seed(0)
  common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                initializer_range=0.2)
  if family == "modernbert":
    model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
        **common, local_attention=16, global_attn_every_n_layers=2, bos_token_id=None,
        eos_token_id=None, cls_token_id=2, sep_token_id=3, attn_implementation="eager"))
  else:  # DeBERTa-v3's attention: c2p + p2c, shared keys, log buckets
    model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        **common, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
        position_buckets=16, max_relative_positions=64, norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
  model.save_pretrained(folder)
  return folder


def _config(family: str, task: str, hf: pathlib.Path, data_dir, **fields):
  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "family": family, "task": task, "init_from": str(hf), "data.data_dir": str(data_dir),
      "optim.learning_rate": 3e-3, "optim.warmup_steps": 0, "checkpoint.every_epochs": 100,
      "log.every_steps": 1, "log.progress": False, **fields})
  return config


def _losses(workdir: pathlib.Path) -> list:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deberta", "modernbert"])
def test_conll_finetuning_from_a_hugging_face_folder(family, shared_data, tmp_path):
  data_dir = shared_data / "conll2003"
  sentences = ner.read_conll(str(data_dir / "train.txt.gz")).sentences[:16]
  hf = _hf_folder(family, tmp_path / "hf", [" ".join(s.words) for s in sentences])
  config = _config(family, "conll", hf, data_dir, **{
      "data.train_split": "train.txt", "data.eval_splits": "train.txt",
      "data.predict_split": "train.txt", "data.max_train_examples": 16,
      "data.max_eval_examples": 16, "data.max_length": 48, "data.padding": "max",
      "train.batch_size": 8, "eval.batch_size": 16, "train.num_epochs": 4})
  workdir = tmp_path / "run"
  out = finetune.finetune(config, str(workdir))
  losses = _losses(workdir)
  assert len(losses) == 8 and np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
  assert 0.0 <= out["eval/train.txt/f1"] <= 1.0
  blocks = pathlib.Path(finetune.predict(config, str(workdir), out=str(tmp_path / "p"))
                        ).read_text(encoding="utf-8").strip("\n").split("\n\n")
  assert len(blocks) == len(sentences)
  assert [line.split(" ")[0] for line in blocks[0].split("\n")] == list(sentences[0].words)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deberta", "modernbert"])
def test_squad_finetuning_from_a_hugging_face_folder(family, shared_data, tmp_path):
  data_dir = shared_data / "squad"
  examples = squad.read_squad(str(data_dir / "dev-v1.1.json.gz")).examples[:8]
  hf = _hf_folder(family, tmp_path / "hf", [e.question for e in examples]
                  + [" ".join(e.paragraph.words) for e in examples])
  config = _config(family, "squad", hf, data_dir, **{
      "data.train_split": "dev-v1.1.json", "data.eval_splits": "dev-v1.1.json",
      "data.predict_split": "dev-v1.1.json", "data.max_train_examples": 8,
      "data.max_eval_examples": 8, "data.max_length": 96, "data.doc_stride": 48,
      "data.max_query_length": 24, "data.padding": "max", "train.batch_size": 8,
      "eval.batch_size": 16, "train.num_epochs": 3})
  workdir = tmp_path / "run"
  out = finetune.finetune(config, str(workdir))
  losses = _losses(workdir)
  assert len(losses) >= 3 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses
  assert 0.0 <= out["eval/dev-v1.1.json/exact"] <= 100.0
  assert 0.0 <= out["eval/dev-v1.1.json/f1"] <= 100.0
  with open(finetune.predict(config, str(workdir), out=str(tmp_path / "p")),
            encoding="utf-8") as f:
    predictions = json.load(f)
  assert sorted(predictions) == sorted(e.qas_id for e in examples)
