"""Voice activity detection over many live streams, batched per tick."""
