"""Input pipelines: tokenizers, text sources, masking, span corruption, the pipeline."""
