"""The stream relay: upstream SSE decoded, chunks written to the job's stream, the
response assembled."""
