"""Parity tools: tolerances, strategies and comparisons that porters can use.

    from paligemma.parity import check, golden
    report = check("golden.npz", "theirs.npz", dtype="float32")    # docs/porting.md
"""

from . import golden
from .compare import Report, check

__all__ = ["Report", "check", "golden"]
