"""Model families: BERT-style encoders (bert.py) and T5 encoder-decoders (t5.py)."""
