"""Data: corpus, tokenizer, packed memory-mapped token shards, batch sizing."""
