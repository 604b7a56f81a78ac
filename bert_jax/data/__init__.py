"""Input pipelines: tokenizers, text sources, masking, span corruption, packing."""
