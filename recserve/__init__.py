"""recserve: compress, compile, serve, route and roll out large recommendation models."""

__version__ = "0.1.0"
