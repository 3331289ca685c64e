"""Benchmarks behind `make bench`: each module returns results as JSON-able dicts plus Markdown."""
