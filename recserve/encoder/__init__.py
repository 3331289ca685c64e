"""Text query encoders for search (issue 19): export, tokenization, and the artifact between them."""
