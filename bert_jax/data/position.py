"""Data positions: where each data shard of the training stream stands.

Position (what the trainer saves in its checkpoint): a JSON-ready dict
  {"num_shards": S, "group_size": G, "read_mode": "files" | "documents",
   "shard": [ids...], "epoch": [...], "group": [...], "offset": [...]}
one entry per data shard the iterator runs. `read_mode` is how the source
was dealt to the shards (pipeline.py: whole files, or document by document);
the same counts mean different streams in the two, so a position only
resumes in its own mode (positions saved before the field existed have none
and are taken as they are). (epoch, group, offset) says: the
shard's next example is example number `offset` of the stream that starts at
group `group` of epoch `epoch` (offset may run past that group into later
ones). After a batch it is the provenance of the shard's last example, with
offset k + 1. Resuming skips the raw documents before the group (before any
tokenization), rebuilds that group and drops `offset` examples. Positions are
keyed by shard id, so `merge_positions` of all hosts' positions lets a run
restart with another process_count. There is no `start_step` shortcut: only
the saved position resumes exactly.
"""
from typing import Any, Dict, List, Optional, Sequence

import ml_collections
import numpy as np


def make_position(cfg, per_shard: Dict[int, tuple],
                  read_mode: Optional[str] = None) -> Dict[str, Any]:
  """The position dict of `per_shard` (shard -> (epoch, group, offset)).

  Args:
    cfg: anything with num_shards and group_size (the data config).
    per_shard: data shard id -> (epoch, group, offset).
    read_mode: 'files' or 'documents' (left out when None).
  """
  ids = sorted(per_shard)
  out = {"num_shards": int(cfg.num_shards), "group_size": int(cfg.group_size),
         "shard": ids, "epoch": [per_shard[s][0] for s in ids],
         "group": [per_shard[s][1] for s in ids], "offset": [per_shard[s][2] for s in ids]}
  if read_mode is not None:
    out["read_mode"] = read_mode
  return out


def merge_positions(positions: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Joins the positions saved by several hosts into one (keyed by shard id)."""
  if not positions:
    raise ValueError("merge_positions needs at least one position")
  per_shard = {}
  for p in positions:
    for key in ("num_shards", "group_size", "read_mode"):
      if p.get(key) != positions[0].get(key):
        raise ValueError(f"positions disagree on {key}: {p.get(key)} vs "
                         f"{positions[0].get(key)}")
    for s, e, g, o in zip(p["shard"], p["epoch"], p["group"], p["offset"]):
      per_shard[int(s)] = (int(e), int(g), int(o))
  cfg = ml_collections.ConfigDict(dict(num_shards=positions[0]["num_shards"],
                                       group_size=positions[0]["group_size"]))
  return make_position(cfg, per_shard, positions[0].get("read_mode"))


def start_of(cfg, position: Optional[Dict[str, Any]], shards: List[int],
             read_mode: Optional[str] = None) -> Dict[int, tuple]:
  """(epoch, group, offset) per shard from a saved position (or the start).

  Raises:
    ValueError: the position was saved with another num_shards / group_size
      or read mode (the stream would differ) or lacks one of `shards`.
  """
  if position is None:
    return {s: (0, 0, 0) for s in shards}
  for key in ("num_shards", "group_size"):
    if int(np.asarray(position[key])) != cfg[key]:
      raise ValueError(f"the saved data position has {key}={position[key]} but "
                       f"data.{key}={cfg[key]}: the stream would differ, cannot resume")
  saved_mode = position.get("read_mode")
  if saved_mode is not None and read_mode is not None and str(saved_mode) != read_mode:
    raise ValueError(f"the saved data position was read in {saved_mode} mode, but the source "
                     f"{cfg.source!r} is now read in {read_mode} mode (its number of files "
                     f"vs data.num_shards={cfg.num_shards} changed): the stream would "
                     "differ, cannot resume")
  saved = {int(s): (int(e), int(g), int(o)) for s, e, g, o in zip(
      position["shard"], position["epoch"], position["group"], position["offset"])}
  missing = [s for s in shards if s not in saved]
  if missing:
    raise ValueError(f"the saved data position has no entry for data shards {missing} "
                     "(merge all hosts' positions with merge_positions)")
  return {s: saved[s] for s in shards}
