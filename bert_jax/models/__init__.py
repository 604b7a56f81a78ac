"""Model families: BERT-style encoders (bert.py) and T5 encoder-decoders (t5.py)."""
import dataclasses


def config_from_dict(cls, d):
  """Builds the config dataclass `cls` from a mapping; an unknown key is an error naming it.

  Shared by BertConfig and T5Config so `config.model` typos fail the same way
  in both families.
  """
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
  return cls(**dict(d))
