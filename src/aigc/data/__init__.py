"""Data preparation: sources → cleaning → dedup → redaction → split → tokenizer → shards."""
