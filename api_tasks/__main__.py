"""``python -m api_tasks``: the command-line interface."""

from api_tasks.cli import main

__all__: list[str] = []

raise SystemExit(main())
