"""`python -m graft_trio ...` is the `graft-trio` command."""

from graft_trio.cli import main

raise SystemExit(main())
