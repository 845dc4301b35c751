"""`python -m megacore ...` (and `torchrun ... -m megacore ...`) run the `megacore` command."""

from megacore.cli import main

raise SystemExit(main())
