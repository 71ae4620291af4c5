"""`python -m paligemma.cli ...` is the `paligemma` command."""

from .main import main

raise SystemExit(main())
