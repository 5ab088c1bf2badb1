"""`python -m confedge` is the `confedge` command."""

from confedge.cli import main

raise SystemExit(main())
