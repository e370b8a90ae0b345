"""Data: shard writing (prepare), the streaming loader, image transforms."""
