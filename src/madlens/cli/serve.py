"""`madlens serve`: a saved monitor behind an OpenAI-compatible HTTP API."""
