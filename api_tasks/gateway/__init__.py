"""The HTTP gateway: OpenAI-compatible endpoints and a jobs API onto the queue, on asyncio.

A producer only: it submits jobs and reads their records and streams through the same
record code as the Python producer (``api_tasks.record``), and calls no upstream itself.
"""
