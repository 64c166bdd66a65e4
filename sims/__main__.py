"""``python -m sims``: run a campaign of seeds, or replay one."""

from sims.cli import main

raise SystemExit(main())
