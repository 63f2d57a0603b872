"""Recognition of whole utterances with dynamic batching."""
