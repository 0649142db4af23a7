"""The batched closed-loop driving world."""
