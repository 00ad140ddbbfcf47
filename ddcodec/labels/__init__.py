"""Teachers and the soft-label codec."""
