"""T5 checkpoint import/export against transformers' PyTorch T5 (CPU, float32).

Reference models are tiny and randomly initialised; relative_attention_max_distance
is shrunk to 16 (8 buckets) so that short sequences reach the logarithmic buckets.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from bert_jax.convert.hf import CheckpointError
from bert_jax.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Padded batch: row 0 fills the encoder, row 1 is padded; decoders start with 0.
ENC = np.array([[5, 17, 9, 33, 41, 12, 7, 60, 21, 3, 8, 1],
                [14, 22, 90, 6, 1, 0, 0, 0, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 11, 4, 19, 27, 30, 2, 52, 1],
                [0, 70, 13, 1, 0, 0, 0, 0, 0]], np.int32)


def _hf_model(version: str, untie: bool = False):
  """A random transformers T5ForConditionalGeneration of version '1.0' or '1.1'."""
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      dropout_rate=0.0, feed_forward_proj="relu" if version == "1.0" else "gated-gelu",
      tie_word_embeddings=version == "1.0",
      # transformers 5 needs these three explicitly or its forward pass fails.
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if untie:  # a real v1.1 checkpoint has its own lm_head
    model.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32))
  return model


def _hf_logits(model, enc=ENC, dec=DEC):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc, dtype=torch.long),
                attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(dec, dtype=torch.long))
  return out.logits.numpy()


def _ours(model, params, enc=ENC, dec=DEC):
  return np.asarray(model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.fixture(scope="module", params=[("1.0", False), ("1.1", True)], ids=["v1_0", "v1_1"])
def hf_folder(request, tmp_path_factory):
  version, untie = request.param
  model = _hf_model(version, untie)
  path = tmp_path_factory.mktemp(f"t5_{version}")
  model.save_pretrained(path)
  return version, model, path


def test_logits_match_transformers_on_padded_batch(hf_folder):
  version, hf, path = hf_folder
  model, params = bert_jax.from_pretrained(path)
  assert isinstance(model, t5.T5Model)
  assert model.config.tie_word_embeddings == (version == "1.0")
  assert model.config.activations == (("relu",) if version == "1.0" else ("gelu_tanh", "linear"))
  np.testing.assert_allclose(_ours(model, params), _hf_logits(hf), atol=1e-4, rtol=0)


def test_hf_v1_1_without_lm_head_loads_as_untied_copy(tmp_path):
  # transformers 5 ties a fresh v1.1 model's lm_head to the embedding but does
  # not scale it: we load that as an untied, unscaled copy.
  hf = _hf_model("1.1", untie=False)
  hf.save_pretrained(tmp_path)
  model, params = bert_jax.from_pretrained(tmp_path)
  assert not model.config.tie_word_embeddings
  np.testing.assert_allclose(params["logits_dense"]["kernel"], params["shared"]["embedding"].T)
  np.testing.assert_allclose(_ours(model, params), _hf_logits(hf), atol=1e-4, rtol=0)


def test_encoder_only_matches_t5_encoder_model(hf_folder, tmp_path):
  _, hf, path = hf_folder
  ref = transformers.T5EncoderModel.from_pretrained(path).eval()
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ENC, dtype=torch.long),
                   attention_mask=torch.tensor(ENC != 0, dtype=torch.long)).last_hidden_state
  for folder in (path, None):  # the encoder half of a full checkpoint, then a T5EncoderModel one
    if folder is None:
      ref.save_pretrained(tmp_path / "enc")
      folder = tmp_path / "enc"
      model, params = bert_jax.from_pretrained(folder)
    else:
      model, params = bert_jax.from_pretrained(folder, task="encoder")
    assert isinstance(model, t5.T5EncoderModel)
    hidden = np.asarray(model.apply({"params": params}, jnp.asarray(ENC)))
    valid = ENC != 0  # padded queries differ (we mask them entirely) and are never read
    np.testing.assert_allclose(hidden[valid], expected.numpy()[valid], atol=1e-4, rtol=0)


def test_export_round_trip_loads_in_transformers(hf_folder, tmp_path):
  version, hf, path = hf_folder
  model, params = bert_jax.from_pretrained(path)
  out = bert_jax.save_pretrained(model, params, tmp_path / "export")
  config = json.loads((out / "config.json").read_text())
  assert config["feed_forward_proj"] == ("relu" if version == "1.0" else "gated-gelu")
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_allclose(_hf_logits(reloaded), _hf_logits(hf), atol=1e-5, rtol=0)
  # And back into bert_jax: the same parameters.
  model2, params2 = bert_jax.from_pretrained(out)
  assert model2.config == model.config
  for a, b in zip(*(sorted(_flat(p).items()) for p in (params, params2))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_export_of_fresh_model_and_encoder(tmp_path):
  import jax
  config = t5.T5Config.preset("t5_v1_1_tiny", vocab_size=96, dropout_rate=0.0)
  model = t5.T5Model(config)
  params = model.init(jax.random.key(3), jnp.asarray(ENC), jnp.asarray(DEC))["params"]
  out = bert_jax.save_pretrained(model, params, tmp_path / "fresh")
  hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_allclose(_ours(model, params), _hf_logits(hf), atol=1e-4, rtol=0)
  encoder = t5.T5EncoderModel(config)
  enc_params = {k: params[k] for k in ("shared", "encoder")}
  out = bert_jax.save_pretrained(encoder, enc_params, tmp_path / "encoder")
  ref = transformers.T5EncoderModel.from_pretrained(out).eval()
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ENC, dtype=torch.long),
                   attention_mask=torch.tensor(ENC != 0)).last_hidden_state.numpy()
  hidden = np.asarray(encoder.apply({"params": enc_params}, jnp.asarray(ENC)))
  np.testing.assert_allclose(hidden[ENC != 0], expected[ENC != 0], atol=1e-4, rtol=0)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _rewrite(path, edit):
  from safetensors.numpy import load_file, save_file
  file = path / "model.safetensors"
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})
  return file


def test_missing_tensor_names_file_and_parameter(tmp_path):
  _hf_model("1.0").save_pretrained(tmp_path)
  name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  file = _rewrite(tmp_path, lambda t: t.pop(name))
  with pytest.raises(CheckpointError) as err:
    bert_jax.from_pretrained(tmp_path)
  assert str(file) in str(err.value) and name in str(err.value) and "missing" in str(err.value)


def test_misshaped_tensor_names_file_and_parameter(tmp_path):
  _hf_model("1.1").save_pretrained(tmp_path)
  name = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
  file = _rewrite(tmp_path, lambda t: t.update({name: np.zeros((47, 32), np.float32)}))
  with pytest.raises(CheckpointError) as err:
    bert_jax.from_pretrained(tmp_path)
  msg = str(err.value)
  assert str(file) in msg and name in msg and "(47, 32)" in msg and "(48, 32)" in msg


def test_unknown_head_tensor_is_an_error(tmp_path):
  _hf_model("1.0").save_pretrained(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({"classification_head.dense.weight":
                                         np.zeros((4, 32), np.float32)}))
  with pytest.raises(CheckpointError, match="classification_head.dense.weight"):
    bert_jax.from_pretrained(tmp_path)


def test_mt5_model_type_loads_with_the_same_names(tmp_path):
  hf = _hf_model("1.1", untie=True)
  hf.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(model_type="mt5", architectures=["MT5ForConditionalGeneration"])
  (tmp_path / "config.json").write_text(json.dumps(config))
  model, params = bert_jax.from_pretrained(tmp_path)
  assert isinstance(model, t5.T5Model) and not model.config.tie_word_embeddings
  np.testing.assert_allclose(_ours(model, params), _hf_logits(hf), atol=1e-4, rtol=0)
