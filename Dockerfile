FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api_tasks ./api_tasks
COPY worker ./worker
COPY config ./config
RUN pip install --no-cache-dir ".[flower,tokenizer]" && useradd --create-home app
USER app
CMD ["celery", "-A", "worker", "worker", "-P", "threads", "-l", "INFO"]
