"""ALBERT's Hugging Face naming, for the BERT family's converter (convert/bert.py).

ALBERT is a BertConfig with `embedding_size` (factorised embeddings) and
`share_layers` (cross-layer sharing); convert/bert.py reads and writes it
through the same table-driven import and export as BERT and RoBERTa and asks
this module only for what is named differently: the encoder's and heads'
tensor names and the config.json fields.

Hugging Face ALBERT stores `num_hidden_groups` groups of `inner_group_num`
layers; layer i of num_hidden_layers runs group i * groups // layers. The
released models have one group of one layer (share_layers='all'); one group
per layer, one layer each, is share_layers='none'. Other layouts have no
BertConfig equivalent and are an error naming the field.
"""
from __future__ import annotations

from typing import Iterator

from bert_jax.convert.hf import CheckpointError


def config_fields_from_hf(hf: dict, source: str) -> dict:
  """The BertConfig fields an ALBERT config.json sets beyond BERT's own."""
  layers, groups = hf.get("num_hidden_layers", 12), hf.get("num_hidden_groups", 1)
  if hf.get("inner_group_num", 1) != 1:
    raise CheckpointError(f"{source}: inner_group_num={hf['inner_group_num']} is not supported "
                          f"(only 1: one layer per group, as the released ALBERT models)")
  if groups not in (1, layers):
    raise CheckpointError(f"{source}: num_hidden_groups={groups} is not supported (only 1, "
                          f"all layers shared, or num_hidden_layers={layers}, none shared)")
  if "embedding_size" not in hf:
    raise CheckpointError(f"{source}: config.json lacks 'embedding_size'")
  return dict(embedding_size=hf["embedding_size"],
              share_layers="all" if groups == 1 else "none")


def hf_config_fields(cfg) -> dict:
  """The config.json fields of an ALBERT export beyond BERT's own; checks it can be written."""
  if not cfg.embedding_size:
    raise CheckpointError("cannot export to Hugging Face albert: it needs factorised embeddings "
                          "(embedding_size > 0), the model has embedding_size=0")
  if cfg.share_layers not in ("all", "none"):
    raise CheckpointError(f"cannot export share_layers={cfg.share_layers!r} to Hugging Face "
                          f"albert: it shares whole layers ('all') or none ('none')")
  return dict(embedding_size=cfg.embedding_size, inner_group_num=1,
              num_hidden_groups=1 if cfg.share_layers == "all" else cfg.num_layers,
              classifier_dropout_prob=cfg.dropout_rate, bos_token_id=2, eos_token_id=3)


def encoder_entries(cfg, n, base: str, add_pooler: bool) -> Iterator:
  """The encoder's parameters under ALBERT's names; `n` is convert/bert.py's _HFNames."""
  j = lambda *parts: ".".join(p for p in parts if p)
  enc = ("encoder",)
  emb = enc + ("embeddings",)
  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    yield n.embed(emb + (table,), j(base, "embeddings", table))
  yield from n.norm(emb + ("layer_norm",), j(base, "embeddings", "LayerNorm"))
  yield from n.dense(emb + ("projection",), j(base, "encoder", "embedding_hidden_mapping_in"))
  stored = 1 if cfg.share_layers == "all" else cfg.num_layers
  for i in range(stored):  # group i holds stored layer i
    ours = enc + (f"layer_{i}",)
    theirs = j(base, "encoder", f"albert_layer_groups.{i}.albert_layers.0")
    for proj in ("query", "key", "value"):
      yield from n.dense(ours + ("attention", proj), j(theirs, "attention", proj))
    yield from n.dense(ours + ("attention", "out"), j(theirs, "attention", "dense"), n_in=2)
    yield from n.norm(ours + ("attention_norm",), j(theirs, "attention", "LayerNorm"))
    yield from n.dense(ours + ("mlp", "wi"), j(theirs, "ffn"))
    yield from n.dense(ours + ("mlp", "wo"), j(theirs, "ffn_output"))
    yield from n.norm(ours + ("mlp_norm",), j(theirs, "full_layer_layer_norm"))
  if add_pooler:
    yield from n.dense(enc + ("pooler",), j(base, "pooler"))


def pooler_name(base: str) -> str:
  """The pooler's weight, whose presence says whether a saved AlbertModel has one."""
  return f"{base + '.' if base else ''}pooler.weight"


def head_entries(task: str, n) -> Iterator:
  """The task head's parameters under ALBERT's names (AlbertForPreTraining, ...)."""
  if task in ("mlm", "pretraining"):
    yield from n.dense(("mlm", "transform"), "predictions.dense")
    yield from n.norm(("mlm", "transform_norm"), "predictions.LayerNorm")
    yield n.vector(("mlm", "output_bias"), "predictions.bias")
  if task == "pretraining":  # sentence-order prediction over the pooled output
    yield from n.dense(("nsp",), "sop_classifier.classifier")
  if task in ("sequence_classification", "token_classification"):
    yield from n.dense(("classifier",), "classifier")
  if task == "question_answering":
    yield from n.dense(("qa_outputs",), "qa_outputs")


def tied(base: str) -> dict[str, str]:
  """The MLM decoder's stored copies -> the tensors they are tied to."""
  return {"predictions.decoder.weight": f"{base + '.' if base else ''}embeddings."
                                        f"word_embeddings.weight",
          "predictions.decoder.bias": "predictions.bias"}
