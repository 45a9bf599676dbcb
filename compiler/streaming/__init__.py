"""Block streaming: compile and evaluate models larger than memory, one block resident at a time
(docs/streaming.md)."""
