"""BART: parity with Hugging Face transformers, export, cached decoding, sharding, text-to-text.

Randomly initialised transformers Bart* models (eager attention) in two
configurations (A: encoder 2 / decoder 3 layers, B: scale_embedding, tanh
GELU, 4 heads), with padding in the batch; outputs compared at max abs diff
<= 1e-4 on real tokens.
"""
import json
import math
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax import decoding
from bert_jax import models
from bert_jax.models import bart
from bert_jax.models.bart_config import BartConfig
from conftest import assert_sharded_equals_unsharded, random_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB = 96
PAD, EOS, START = 1, 2, 2
CONFIGS = {
    "a": dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
              encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=48,
              decoder_ffn_dim=40, max_position_embeddings=32),
    "b": dict(vocab_size=VOCAB, d_model=48, encoder_layers=1, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
              decoder_ffn_dim=64, max_position_embeddings=24, scale_embedding=True,
              activation_function="gelu_new"),
}
HF_CLASSES = {"seq2seq": "BartForConditionalGeneration", "base": "BartModel",
              "sequence_classification": "BartForSequenceClassification"}


def _encoder_batch():
  """[3, 12] ids ending in </s>, rows 1 and 2 padded with <pad>=1; and the mask."""
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (3, 12))
  ids[:, 0] = 0  # <s>
  ids[0, -1] = EOS
  ids[1, 8], ids[1, 9:] = EOS, PAD
  ids[2, 4], ids[2, 5:] = EOS, PAD
  return ids, (ids != PAD).astype(np.int64)


def _decoder_batch():
  ids = np.random.RandomState(1).randint(3, VOCAB, (3, 7))
  ids[:, 0] = START
  return ids


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """(config name, task) -> (HF model in eval mode, its saved folder)."""
  cache = {}

  def get(name, task):
    if (name, task) not in cache:
      torch.manual_seed(len(cache))
      config = transformers.BartConfig(**CONFIGS[name], num_labels=3,
                                       attn_implementation="eager")
      model = getattr(transformers, HF_CLASSES[task])(config).eval()
      if task == "seq2seq":
        with torch.no_grad():
          # Random std-0.02 weights leave the logits to the bias and the decoder
          # blind to the encoder: wider ones make greedy outputs differ per input.
          model.final_logits_bias.normal_(0.0, 0.01)  # a zero buffer otherwise
          for n, p in model.named_parameters():
            if n.endswith(("proj.weight", "shared.weight")) or ".fc" in n:
              p.mul_(10.0)
      folder = tmp_path_factory.mktemp(f"bart_{name}_{task}")
      cache[name, task] = random_hf_folder(model, folder,
                                           extra_norm_names=("layer_norm", "layernorm"))
    return cache[name, task]
  return get


def _close(ours, theirs, mask=None):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape
  if mask is not None:
    ours, theirs = ours[mask > 0], theirs[mask > 0]
  diff = float(np.abs(ours - theirs).max())
  print(f"max abs diff {diff:.2e}")
  assert diff <= ATOL, diff


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("task", ["seq2seq", "base", "sequence_classification"])
def test_parity_with_transformers(hf_folders, name, task):
  hf, folder = hf_folders(name, task)
  model, params = bert_jax.from_pretrained(folder)
  assert bart.task_of(model) == task
  ids, mask = _encoder_batch()
  dec = _decoder_batch()
  with torch.no_grad():
    kwargs = {} if task == "sequence_classification" else {
        "decoder_input_ids": torch.tensor(dec)}
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  if task == "sequence_classification":
    # Eager: a tiny model applies op by op faster than it compiles.
    out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    _close(out["logits"], ref.logits)
    return
  out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32))
  _close(out, ref.logits if task == "seq2seq" else ref.last_hidden_state)


@pytest.mark.parametrize("name, task", [("a", "seq2seq"), ("b", "sequence_classification")])
def test_round_trip_keeps_every_tensor_and_reloads(hf_folders, tmp_path, name, task):
  hf, folder = hf_folders(name, task)
  model, params = bert_jax.from_pretrained(folder)
  out = bert_jax.save_pretrained(model, params, tmp_path / "out")
  cls = getattr(transformers, HF_CLASSES[task])
  reloaded, info = cls.from_pretrained(out, output_loading_info=True,
                                       attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  original = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  again = {k: v.detach().numpy() for k, v in reloaded.state_dict().items()}
  assert set(original) == set(again)
  for k in original:
    np.testing.assert_array_equal(original[k], again[k], err_msg=k)
  saved = json.loads((out / "config.json").read_text())
  assert saved["architectures"] == [HF_CLASSES[task]]
  assert saved["scale_embedding"] == CONFIGS[name].get("scale_embedding", False)


def test_classification_head_starts_new_from_a_generation_folder(hf_folders):
  _, folder = hf_folders("a", "seq2seq")
  model, params = bert_jax.from_pretrained(folder, task="sequence_classification")
  assert model.num_labels == 3 and "final_logits_bias" not in params
  assert params["classification_head"]["out_proj"]["kernel"].shape == (32, 3)


# ------------------------------------------------------------------ decoding


@pytest.fixture(scope="module")
def generator(hf_folders):
  hf, folder = hf_folders("a", "seq2seq")
  model, params = bert_jax.from_pretrained(folder)
  return hf, model, params


def _until_eos(row):
  row = list(row)
  return row[:row.index(EOS) + 1] if EOS in row else row


def test_cached_greedy_equals_full_passes_and_hf_generate(generator):
  hf, model, params = generator
  ids, mask = _encoder_batch()
  steps = 8
  tokens, log_probs = decoding.greedy_decode(model, params, jnp.asarray(ids, jnp.int32),
                                             max_decode_length=steps, eos_id=EOS)
  tokens = np.asarray(tokens)
  # Repeated teacher-forced passes over the prefix decoded so far.
  # One decoder length for every pass (one compilation): the decoder is causal,
  # so the zeros after the prefix do not change position i's logits.
  full = lambda d: jax.nn.log_softmax(  # noqa: E731  (eager: faster than compiling here)
      model.apply({"params": params}, jnp.asarray(ids, jnp.int32), d))
  prefix = np.zeros((3, steps + 1), np.int32)
  prefix[:, 0] = START
  total = np.zeros(3)
  done = np.zeros(3, bool)
  for i in range(steps):
    logp = np.asarray(full(prefix))[:, i]
    best = logp.argmax(-1)
    total += np.where(done, 0.0, logp[np.arange(3), best])
    prefix[:, i + 1] = np.where(done, 0, best)
    done |= best == EOS
  for ours, ref in zip(tokens, prefix[:, 1:]):
    assert _until_eos(ours) == _until_eos(ref)
  np.testing.assert_allclose(np.asarray(log_probs), total, atol=1e-4)
  with torch.no_grad():
    theirs = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=steps, do_sample=False, num_beams=1,
                         forced_bos_token_id=None, forced_eos_token_id=None, min_length=0,
                         no_repeat_ngram_size=0, decoder_start_token_id=START).numpy()
  assert (theirs[:, 0] == START).all()
  for ours, ref in zip(tokens, theirs[:, 1:]):
    assert _until_eos(ours) == _until_eos(ref)
  assert len({tuple(_until_eos(r)) for r in tokens}) > 1  # not a degenerate constant output


# ------------------------------------------------------------------ sharding


def _random_params(abstract):
  """Random float32 params of init's abstract output (numpy: initialisers compile slowly)."""
  rng = np.random.RandomState(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape)
                       ).astype(np.float32), flax.linen.unbox(abstract)["params"])


def test_sharded_run_equals_unsharded_and_every_param_is_named():
  config = BartConfig.preset("tiny", vocab_size=64, d_model=32, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=32,
                             num_encoder_layers=1, num_decoder_layers=1)
  model = bart.build(config, "seq2seq")
  ids, _ = _encoder_batch()
  ids = np.where(ids[[0, 1, 2, 0]] == PAD, PAD, ids[[0, 1, 2, 0]] % 64).astype(np.int32)
  dec = (_decoder_batch()[[0, 1, 2, 0]] % 64).astype(np.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids, dec)
  assert_sharded_equals_unsharded(model, _random_params(abstract), (ids, dec))


# ------------------------------------------------------------------ registry


def test_family_registry_presets_and_errors():
  family = models.get("bart")
  assert family.encoder_decoder and family.finetune_task == "seq2seq"
  assert set(family.tasks) == set(bart.TASKS)
  base, large = family.preset("base"), family.preset("large")
  assert (base.num_encoder_layers, base.num_decoder_layers, base.d_model,
          base.encoder_attention_heads, base.encoder_ffn_dim, base.vocab_size) == (
              6, 6, 768, 12, 3072, 50265)
  assert (large.num_encoder_layers, large.d_model, large.decoder_attention_heads,
          large.decoder_ffn_dim) == (12, 1024, 16, 4096)
  assert models.family_of(family.build(family.preset("tiny"), "seq2seq")) is family
  flops = family.train_flops(base, {"encoder_input_tokens": (1, 512),
                                    "decoder_target_tokens": (1, 128)}, "seq2seq")
  # ~6 x (non-embedding parameters x tokens through them + tied logits); attention adds the rest.
  enc_layer, dec_layer = 4 * 768**2 + 2 * 768 * 3072, 8 * 768**2 + 2 * 768 * 3072
  approx = 6 * (6 * enc_layer * 512 + 6 * dec_layer * 128 + 768 * 50265 * 128)
  assert 1.0 < flops / approx < 1.25, flops / approx
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['d_modle'\]"):
    models.model_config("bart", "tiny", d_modle=3)
  with pytest.raises(ValueError, match=r"BartConfig.encoder_attention_heads: 5"):
    BartConfig.preset("tiny", encoder_attention_heads=5)
  with pytest.raises(ValueError, match="unknown BART task 'mlm'"):
    bart.build(base, "mlm")


# ------------------------------------------------------------------ fine-tuning


def _tiny_bpe(folder):
  """A RoBERTa-layout vocab.json + merges.txt: specials, the 256 byte symbols, two merges."""
  from bert_jax.data import bpe  # pylint: disable=import-outside-toplevel
  pieces = ["<s>", "<pad>", "</s>", "<unk>"] + list(bpe.bytes_to_unicode().values())
  pieces += ["\u0120t", "he", "<mask>"]
  (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}),
                                     encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n\u0120 t\nh e\n", encoding="utf-8")
  return len(pieces)


def test_text_to_text_finetuning_from_an_exported_folder(tmp_path):
  """A random BART exported with its BPE files fine-tunes on SST-2 as text; eval beam-decodes."""
  import sys  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  from bert_jax import finetune  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "bart"
  folder.mkdir()
  vocab = _tiny_bpe(folder)
  config = BartConfig.preset("tiny", vocab_size=math.ceil(vocab / 8) * 8, d_model=32,
                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                             dropout_rate=0.0)
  model = bart.build(config, "seq2seq")
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0),
                                         jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))
  exported = tmp_path / "export"
  bert_jax.save_pretrained(model, params, exported)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(exported / name, folder / name)
  data = tmp_path / "glue" / "SST-2"
  data.mkdir(parents=True)
  rows = [("a fine film .", 1), ("the worst plot .", 0), ("good and warm .", 1),
          ("dull , flat , long .", 0)] * 4
  for split in ("train", "dev"):
    (data / f"{split}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows), encoding="utf-8")

  root = pathlib.Path(__file__).resolve().parents[1]
  sys.path.insert(0, str(root / "configs"))
  try:
    import text2text as t2t_config  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  ft = t2t_config.get_config("sst2")
  ft.family = "bart"
  ft.update_from_flattened_dict({
      "init_from": str(folder), "data.data_dir": str(tmp_path / "glue"),
      "data.max_length": 32, "data.max_target_length": 4, "data.pad_multiple": 8,
      "train.batch_size": 8, "eval.batch_size": 8, "train.num_epochs": 1, "data.padding": "max",
      "data.max_train_examples": 16, "data.max_eval_examples": 8,
      "decode.beam_size": 2,  # beam search through the task (greedy is tested above)
      "optim.learning_rate": 1e-2, "checkpoint.every_epochs": 100, "log.every_steps": 1,
      "log.progress": False})
  out = finetune.finetune(ft, str(tmp_path / "run"))
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  assert 0.0 <= out["eval/dev/accuracy"] <= 1.0
  assert "eval/dev/num_unparseable" in out
