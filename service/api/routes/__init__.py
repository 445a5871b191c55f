"""The API's routers: ``health`` (probes), ``jobs`` (jobs and what they produce) and
``checkpoints`` (downloads)."""
