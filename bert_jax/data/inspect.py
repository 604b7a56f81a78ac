"""Human-readable views of pipeline batches (the `bert-jax inspect` command).

Masked positions are shown as `[input->target]` so the 80/10/10 outcome is
visible (`[[MASK]->cat]`, `[dog->cat]` for a random replacement, `[cat->cat]`
for a kept token); span-masked (SpanBERT) rows also list each span with its
two boundary tokens; T5 examples show inputs with their sentinels and the
targets that fill them.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def _pieces(tokenizer, ids: Iterable[int]) -> list[str]:
  return [tokenizer.id_to_piece(int(i)) for i in ids]


def _format_spans(batch: dict, row: int, tokenizer) -> str:
  """SpanBERT rows: each masked span's targets between its two boundary tokens.

  The boundaries are the tokens the span boundary objective reads
  (sbo_left_positions = s-1, sbo_right_positions = e+1, per prediction slot),
  shown as they enter the model: `<[CLS]> the quick fox <jumps>`.
  """
  tokens = batch["encoder_input_tokens"][row]
  spans: dict[tuple[int, int], list[str]] = {}  # (s-1, e+1) -> targets, in slot order
  for target, left, right, w in zip(batch["mlm_targets"][row],
                                    batch["sbo_left_positions"][row],
                                    batch["sbo_right_positions"][row], batch["mlm_weights"][row]):
    if w > 0:
      spans.setdefault((int(left), int(right)), []).append(tokenizer.id_to_piece(int(target)))
  piece = lambda pos: tokenizer.id_to_piece(int(tokens[pos])) if 0 <= pos < len(tokens) else "?"
  return " | ".join(f"<{piece(left)}> {' '.join(targets)} <{piece(right)}>"
                    for (left, right), targets in sorted(spans.items()))


def format_mlm_example(batch: dict, row: int, tokenizer) -> str:
  """One encoder row: tokens with each prediction slot as [input->target]."""
  tokens = batch["encoder_input_tokens"][row]
  valid = batch["encoder_segment_ids"][row] > 0 if "encoder_segment_ids" in batch else tokens > 0
  pieces = _pieces(tokenizer, tokens)
  weights = batch["mlm_weights"][row]
  for pos, target, w in zip(batch["mlm_positions"][row], batch["mlm_targets"][row], weights):
    if w > 0:
      pieces[pos] = f"[{pieces[pos]}->{tokenizer.id_to_piece(int(target))}]"
  text = " ".join(p for p, v in zip(pieces, valid) if v)
  lines = [f"tokens ({int(valid.sum())} of {len(tokens)}, {int((weights > 0).sum())} "
           f"predictions): {text}"]
  if "sbo_left_positions" in batch:
    lines.append(f"spans (boundaries in <>): {_format_spans(batch, row, tokenizer)}")
  if "encoder_type_ids" in batch:
    types = batch["encoder_type_ids"][row][valid]
    lines.append(f"token types: A={int((types == 0).sum())} B={int((types == 1).sum())}")
  if "nsp_labels" in batch:
    lines.append(f"nsp/sop label: {int(batch['nsp_labels'][row])}")
  return "\n".join(lines)


def format_seq2seq_example(batch: dict, row: int, tokenizer) -> str:
  """One encoder-decoder row: inputs (sentinels or BART's masks visible) and targets.

  Real tokens are told by the segment ids, since id 0 is a real token (BOS)
  in byte-level BPE vocabularies.
  """
  lines = []
  for name, tokens, segments in (
      ("inputs", "encoder_input_tokens", "encoder_segment_ids"),
      ("targets", "decoder_target_tokens", "decoder_segment_ids")):
    ids = batch[tokens][row]
    real = batch[segments][row] > 0 if segments in batch else ids > 0
    lines.append(f"{name} ({int(real.sum())} tokens): "
                 f"{' '.join(_pieces(tokenizer, ids[real]))}")
  return "\n".join(lines)


def format_batch(batch: dict, tokenizer, num_examples: int) -> str:
  """The first `num_examples` rows of a batch, one block each."""
  fmt = format_seq2seq_example if "decoder_target_tokens" in batch else format_mlm_example
  rows = min(num_examples, len(next(iter(batch.values()))))
  shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(batch.items()))
  blocks = [f"batch: {shapes}"]
  blocks += [f"--- example {r}\n{fmt(batch, r, tokenizer)}" for r in range(rows)]
  return "\n".join(blocks)


def save_batches(path: str, batches: list[dict]) -> None:
  """Writes batches to one .npz: key `b{i}/{feature}` for batch i."""
  arrays = {f"b{i}/{k}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()}
  np.savez_compressed(path, **arrays)
