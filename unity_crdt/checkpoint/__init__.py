"""Checkpoints of whole doc states: the sealed record format, the `Checkpointer` policy, and
sinks opened by URL scheme (`dir://`, `weaviate://`)."""
