"""Speaker embeddings of whole utterances with dynamic batching."""
