"""BART recipes: configs/bart.py sizes, the quick-start variant, summarization fine-tuning.

Summarization runs end to end on CPU from a random tiny BART exported as a
Hugging Face folder (byte-level BPE trained on the test's own sentences);
the T5 variant's task is checked piece by piece with a SentencePiece model
trained on the builtin corpus (prefix, targets, scores, summaries file).
"""
import importlib.util
import json
import math
import pathlib
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import defaults, train
from bert_jax.defaults import ConfigError
from bert_jax.models import bart
from bert_jax.models.bart_config import BartConfig
from bert_jax.tasks import adapters
from conftest import train_roberta_bpe

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A tiny corpus of (document, summary) pairs: the summary reuses the
# document's words, so ROUGE has something to count.
PAIRS = [
    ("the cat sat on the warm mat . it slept all day .", "the cat slept on the mat ."),
    ("rain fell on the old town . the river rose fast .", "the river rose in the rain ."),
    ("the team won the final game . fans sang all night .", "the team won the final ."),
    ("a new bridge opened today . cars crossed the river .", "a new bridge opened ."),
] * 4


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f"test_cfg_{name}",
                                                ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _num_params(config: BartConfig) -> int:
  """Parameters of the seq2seq model from shapes alone (jax.eval_shape: no init runs)."""
  model = bart.build(config, "seq2seq")
  ids = jnp.ones((1, 8), jnp.int32)
  shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


# --------------------------------------------------------------------- configs


def test_bart_configs_have_the_papers_sizes_and_noise():
  module = _config_module("bart")
  base, large = module.get_config("base"), module.get_config("large")
  for config in (base, large):
    assert config.family == "bart" and config.data.objective == "denoising"
    assert (config.data.mask_rate, config.data.poisson_lambda, config.data.permute_sentences,
            config.data.delete_ratio, config.data.rotate_ratio) == (0.3, 3.0, 1.0, 0.0, 0.0)
    assert (config.train.batch_size, config.train.num_steps) == (8000, 500_000)
    assert config.model.vocab_size == 50265 and config.model.max_position_embeddings == 1024
  # fairseq's bart.base is 140M parameters, bart.large 406M (HF: 139.4M / 406.3M
  # with final_logits_bias).
  n_base = _num_params(BartConfig.from_dict(base.model.to_dict()))
  assert 138e6 < n_base < 141e6, n_base
  n_large = _num_params(BartConfig.from_dict(large.model.to_dict()))
  assert 404e6 < n_large < 408e6, n_large
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    module.get_config("huge")


def test_quickstart_bart_validates():
  module = _config_module("quickstart")
  config = module.get_config("bart")
  assert config.family == "bart" and config.data.objective == "denoising"
  assert config.data.mask_rate == 0.3 and config.data.permute_sentences == 1.0
  # The trained vocabulary's [PAD] / [CLS] / [SEP] serve as the model's <pad> / <s> / </s>.
  assert (config.model.pad_token_id, config.model.bos_token_id,
          config.model.eos_token_id) == (0, 2, 3)
  config.model.vocab_size = 4096
  train.validate(config)
  assert "bert-jax train --config=configs/quickstart.py:bart" in module.__doc__
  assert "Expected (bart; measured" in module.__doc__


def test_summarization_config_variants():
  module = _config_module("summarization")
  b, t = module.get_config("bart"), module.get_config("t5")
  assert b.task == t.task == "summarization"
  assert (b.family, b.data.max_length, b.decode.beam_size, b.decode.alpha) == ("bart", 1024, 4,
                                                                             2.0)
  # fairseq's CNN/DM recipe: label smoothing 0.1, >= 55 tokens, no repeated trigram.
  assert (b.train.label_smoothing, b.decode.min_length, b.decode.no_repeat_ngram) == (0.1, 55, 3)
  assert (t.family, t.data.source_prefix, t.optim.name) == ("t5", "summarize: ", "adafactor")
  assert set(b.keys()) == set(defaults.finetune_config().keys())
  assert "bert-jax finetune --config=configs/summarization.py" in module.__doc__
  with pytest.raises(ValueError, match="unknown variant 'pegasus'"):
    module.get_config("pegasus")


def test_summarization_needs_an_encoder_decoder(tmp_path):
  config = defaults.finetune_config()
  config.task, config.data.data_dir = "summarization", str(tmp_path)
  with pytest.raises(ConfigError, match=r"config.family: .*encoder-decoder.*'bert'"):
    adapters.make_task(config, tokenizer=None)


# ---------------------------------------------------------------- fine-tuning


def _write_tsv(folder: pathlib.Path):
  folder.mkdir(parents=True, exist_ok=True)
  for split in ("train", "dev"):
    (folder / f"{split}.tsv").write_text(
        "document\tsummary\n" + "".join(f"{d}\t{s}\n" for d, s in PAIRS), encoding="utf-8")
  (folder / "test.jsonl").write_text(
      "".join(json.dumps({"document": d}) + "\n" for d, _ in PAIRS[:3]), encoding="utf-8")
  return folder


def _tiny_run(config, data_dir, **fields):
  config.update_from_flattened_dict({
      "data.data_dir": str(data_dir), "data.train_split": "train.tsv",
      "data.eval_splits": "dev.tsv", "data.predict_split": "test.jsonl",
      "data.document_key": "document", "data.summary_key": "summary",
      "data.max_length": 32, "data.max_target_length": 12, "data.pad_multiple": 16,
      "train.batch_size": 8, "eval.batch_size": 8, "train.num_epochs": 1,
      "data.max_train_examples": 16, "data.max_eval_examples": 8,
      "optim.learning_rate": 1e-2, "checkpoint.every_epochs": 100, "log.every_steps": 1,
      "log.progress": False, "data.padding": "max", **fields})
  return config


def _random_params(abstract):
  rng = np.random.RandomState(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape)
                       ).astype(np.float32), flax.linen.unbox(abstract)["params"])


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
  """A Hugging Face BART folder: random tiny weights + a BPE trained on PAIRS."""
  folder = tmp_path_factory.mktemp("hf_bart")
  train_roberta_bpe(folder, [t for pair in PAIRS for t in pair] * 8, vocab_size=300)
  vocab = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
  config = BartConfig.preset("tiny", vocab_size=-(-vocab // 8) * 8, d_model=32,
                             encoder_attention_heads=2, decoder_attention_heads=2,
                             encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=64, dropout_rate=0.0)
  model = bart.build(config, "seq2seq")
  ids = jnp.ones((1, 4), jnp.int32)
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0), ids, ids))
  exported = bert_jax.save_pretrained(model, params, folder / "export")
  for name in ("config.json", "model.safetensors"):
    shutil.copy(exported / name, folder / name)
  return folder


def test_bart_summarization_reports_rouge_and_writes_summaries(bart_folder, tmp_path):
  from bert_jax import finetune  # pylint: disable=import-outside-toplevel
  data = _write_tsv(tmp_path / "data")
  config = _tiny_run(_config_module("summarization").get_config("bart"), data,
                     init_from=str(bart_folder),
                     **{"decode.beam_size": 2, "decode.min_length": 3})
  workdir = tmp_path / "run"
  out = finetune.finetune(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses)), losses
  for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    assert 0.0 <= out[f"eval/dev.tsv/{name}"] <= 100.0
  assert out["eval/dev.tsv/gen_len"] >= 0.0
  assert out["best"]["metric"] == "dev.tsv/rougeL"
  assert out["best"]["value"] == out["eval/dev.tsv/rougeL"]

  path = finetune.predict(config, str(workdir))
  assert pathlib.Path(path).name == "test-summaries.jsonl"
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert len(rows) == 3 and all(set(r) == {"summary"} for r in rows)
  assert all(isinstance(r["summary"], str) for r in rows)


def test_t5_summarization_prefixes_documents_and_scores_texts(tmp_path):
  """The T5 variant's task (decoding itself is shared with GLUE text-to-text, tested there)."""
  from bert_jax.data import sources  # pylint: disable=import-outside-toplevel
  from bert_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  tok = tok_lib.train_sentencepiece(sources.iter_paragraphs("builtin:pydoc_topics"),
                                    str(tmp_path / "spm"), 256, input_sentence_size=2000,
                                    num_threads=2)
  data = _write_tsv(tmp_path / "data")
  config = _tiny_run(_config_module("summarization").get_config("t5"), data,
                     **{"data.tokenizer": tok.path, "data.max_target_length": 32})
  task = adapters.make_task(config, tok)
  assert isinstance(task, adapters.Text2TextTask) and task.metric == "rougeL"
  split = task.load("dev.tsv", 3)
  first = tok.decode(split.features[0]["encoder_input_tokens"][:-1].tolist())
  assert first.startswith("summarize: the cat sat"), first
  target = tok.decode(split.features[0]["decoder_target_tokens"][:-1].tolist())
  assert target == PAIRS[0][1]
  batch = task.pad(split.features, 4)
  assert batch["decoder_input_tokens"][0, 0] == 0  # T5 starts from its padding id
  assert batch["decoder_loss_weights"][3].sum() == 0  # the filler row
  perfect = task.score(split, [p for _, p in PAIRS[:3]])
  assert perfect["rouge1"] == perfect["rouge2"] == perfect["rougeL"] == 100.0
  assert task.score(split, ["", "", ""])["rougeL"] == 0.0
  path = task.write(split, [p for _, p in PAIRS[:3]], str(tmp_path / "out"))
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert rows[1] == {"summary": PAIRS[1][1], "reference": PAIRS[1][1]}
