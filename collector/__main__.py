"""``python -m collector`` is ``fleet-collector``."""

from collector.cli import main

raise SystemExit(main())
