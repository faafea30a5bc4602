"""``python -m flowerpets``: the command-line interface."""

from flowerpets.cli import main

raise SystemExit(main())
