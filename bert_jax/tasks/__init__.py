"""Fine-tuning tasks: features, post-processing and metrics (GLUE, NER, SQuAD, text-to-text)."""
