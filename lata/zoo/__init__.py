"""Small, locally built model families for tests and demos (no network needed)."""
