"""``python -m benchmarks``: run one of graft-trio's benchmarks."""

from benchmarks.cli import main

raise SystemExit(main())
