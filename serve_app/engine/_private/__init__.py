"""Internals of the continuous-batching engine (not a public API)."""
