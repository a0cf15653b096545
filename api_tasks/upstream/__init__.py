"""Calling an OpenAI-format upstream: routing and the merged payload, the job URL
allow-list, the HTTP client, retries and redaction."""
