"""`python -m paligemma.ref.demo`: the stage-by-stage tour (tour.py)."""

from .tour import main

raise SystemExit(main())
