"""``python -m api_tasks``: the command-line interface."""

from api_tasks.cli import main

raise SystemExit(main())
