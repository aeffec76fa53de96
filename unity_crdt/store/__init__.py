"""The local cache: the `Store` contract, `MemoryStore`, and `SqliteStore` with its private
engine, cache files and compaction rules."""
