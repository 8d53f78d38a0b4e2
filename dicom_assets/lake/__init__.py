"""I/O edge of the lake: folder layout, table schemas, Delta writes, durable file moves."""
