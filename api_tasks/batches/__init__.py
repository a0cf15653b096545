"""OpenAI Batch-format files: the line format, attached runs, detached batches the
workers pump, and the ``batch`` CLI."""
