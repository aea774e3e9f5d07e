"""`madlens serve`: a monitor behind an OpenAI-compatible API, with auth, an audit log and
Prometheus metrics."""
