"""Stage-by-stage comparison of a port's named activations with a golden file.

    report = check("golden.npz", "theirs.npz", dtype="float32")
    print(report.format_table())
    report.ok, report.first_failure             # bool, the first Row that breaks (or None)
    report.to_json()                            # a dict for machines

Relative error, per stage: max |theirs - golden| / max |golden| over the whole stage
(`tolerances.relative_error`). Each stage is measured against its own scale, so the residual
stream growing through the layers does not make late stages look worse or early ones better,
and near-zero elements (many logits, most attention probabilities) do not blow it up as an
elementwise relative error would. The bound for a stage is the dtype's `STAGE_*` tolerance at
that stage's sensitivity, which the golden's manifest records (parity/golden.py).

Nothing about `theirs` makes `check` raise: missing stages are skipped and listed, extra ones
listed, wrong shapes, non-finite values, a different config or different inputs are reported.
Only an unreadable file raises (`golden.GoldenError`).
"""

import dataclasses
import os

import numpy as np

from paligemma.ref.capture import stage_names
from paligemma.ref.config import GemmaConfig, PaliGemmaConfig, VisionConfig

from . import golden as golden_files
from .tolerances import STAGE_TOLERANCES, relative_error

OK, FAIL, MISSING, SHAPE, NONFINITE = "ok", "FAIL", "missing", "SHAPE", "NON-FINITE"
BROKEN = (FAIL, SHAPE, NONFINITE)


@dataclasses.dataclass(frozen=True)
class Row:
    """One stage: its golden shape, the errors (None when not measured), the bound and the verdict."""

    name: str
    shape: tuple
    max_abs: float | None
    max_rel: float | None
    tolerance: float
    status: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Report:
    """The comparison, rows in pipeline order.

    dtype / tolerance: the dtype compared for and the name of its `Tolerance`.
    missing: golden stages theirs lacks (skipped); extra: theirs' names the golden lacks.
    problems: file-level findings (a different config, different inputs, nothing in common).
    """

    golden: str
    theirs: str
    dtype: str
    tolerance: str
    rows: tuple
    missing: tuple = ()
    extra: tuple = ()
    problems: tuple = ()

    @property
    def first_failure(self):
        return next((r for r in self.rows if r.status in BROKEN), None)

    @property
    def compared(self):
        return sum(r.status != MISSING for r in self.rows)

    @property
    def ok(self):
        return self.first_failure is None and not self.problems and self.compared > 0

    def to_json(self):
        """A JSON-able dict: every field, `ok` and the first failure's name."""
        first = self.first_failure
        return {"ok": self.ok, "first_failure": first.name if first else None, "golden": self.golden,
                "theirs": self.theirs, "dtype": self.dtype, "tolerance": self.tolerance,
                "compared": self.compared, "missing": list(self.missing), "extra": list(self.extra),
                "problems": list(self.problems),
                "rows": [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in self.rows]}

    def format_table(self):
        """The table a person reads: one line per stage, the first failure marked, then a verdict."""
        width = max([len("stage")] + [len(r.name) for r in self.rows])
        lines = [f"golden {self.golden}  vs  {self.theirs}  ({self.dtype}, {self.tolerance})",
                 f"{'stage':<{width}}  {'shape':<18} {'max abs err':>11} {'max rel err':>11} {'tolerance':>9}  status"]
        first = self.first_failure
        for r in self.rows:
            if r.status == MISSING:
                continue
            shape = "x".join(str(d) for d in r.shape)
            fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            mark = "   <-- first failure" if r is first else ""
            note = f" ({r.note})" if r.note else ""
            lines.append(f"{r.name:<{width}}  {shape:<18} {fmt(r.max_abs):>11} {fmt(r.max_rel):>11} "
                         f"{r.tolerance:>9.3g}  {r.status}{note}{mark}")
        if self.missing:
            lines.append(f"missing in theirs, skipped ({len(self.missing)}): {_short(self.missing)}")
        if self.extra:
            lines.append(f"not in the golden, ignored ({len(self.extra)}): {_short(self.extra)}")
        lines += [f"problem: {p}" for p in self.problems]
        if self.ok:
            lines.append(f"PASS: {self.compared} stages within {self.tolerance}")
        elif first is not None:
            how = (f"relative error {first.max_rel:.3g} > {first.tolerance:.3g}" if first.status == FAIL
                   else first.note)
            lines.append(f"FAIL: first broken stage {first.name} ({how})")
        else:
            lines.append("FAIL: " + ("; ".join(self.problems) or "no stage in common with the golden"))
        return "\n".join(lines)


def _short(names, limit=12):
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _as_activations(x, what):
    if isinstance(x, golden_files.Activations):
        return x
    if isinstance(x, (str, os.PathLike)):
        return golden_files.read(x)
    if isinstance(x, dict):
        return golden_files.Activations(dict(x), None, f"<{what}>")
    raise TypeError(f"check: {what} must be a path, an Activations or a dict of arrays, got {type(x).__name__}")


def _config_from_dict(d):
    return PaliGemmaConfig(VisionConfig(**d["vision"]), GemmaConfig(**d["llm"]),
                           **{k: v for k, v in d.items() if k not in ("vision", "llm")})


def _config_differences(ours, theirs, prefix=""):
    """`["llm.num_kv_heads: golden 2, theirs 1", ...]` for two config dicts (`name` is a label: ignored)."""
    found = []
    for key in sorted(set(ours) | set(theirs)):
        if key == "name" and not prefix:
            continue
        a, b = ours.get(key, "(absent)"), theirs.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: golden {a}, theirs {b}")
    return found


def _order(gold: golden_files.Activations):
    """The golden's stages in pipeline order (from its config when the manifest has one)."""
    present = gold.stages
    config = (gold.manifest or {}).get("config")
    try:
        canonical = stage_names(_config_from_dict(config), probs=True) if config else ()
    except (TypeError, ValueError, KeyError):
        canonical = ()
    rank = {n: i for i, n in enumerate(canonical)}
    return sorted(present, key=lambda n: (rank.get(n, len(rank)), present.index(n)))


def _compare_inputs(gold, theirs):
    problems = []
    for key in golden_files.INPUTS:
        if key not in gold.arrays or key not in theirs.arrays:
            continue
        a, b = np.asarray(gold.arrays[key]), np.asarray(theirs.arrays[key])
        if a.shape != b.shape:
            problems.append(f"{key}: shape {list(b.shape)}, the golden's is {list(a.shape)}: not the golden's inputs")
        elif key == "inputs/images":
            err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
            if not err <= 1e-6:  # preprocessing is exact float32 arithmetic; NaN fails too
                problems.append(f"{key}: differ from the golden's by up to {err:.3g}: check resizing and scaling")
        elif not np.array_equal(a.astype(np.int64), b.astype(np.int64)):
            where = np.argwhere(a.astype(np.int64) != b.astype(np.int64))[0].tolist()
            problems.append(f"{key}: differ from the golden's (first at index {where}): not the golden's inputs")
    return problems


def compare_stage(name, expected, actual, tolerance):
    """One `Row`: shape, finiteness, then the errors against the bound."""
    expected = np.asarray(expected, dtype=np.float64)
    shape = tuple(expected.shape)
    try:
        actual = np.asarray(actual, dtype=np.float64)
    except (TypeError, ValueError) as e:
        return Row(name, shape, None, None, tolerance, SHAPE, f"not numbers: {e}")
    if actual.shape != expected.shape:
        hint = "; same size: a transpose or reshape?" if actual.size == expected.size else ""
        return Row(name, shape, None, None, tolerance, SHAPE,
                   f"expected {list(expected.shape)}, got {list(actual.shape)}{hint}")
    bad = ~np.isfinite(actual)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        return Row(name, shape, None, None, tolerance, NONFINITE,
                   f"{int(bad.sum())} non-finite values, first at {first}")
    max_abs = float(np.max(np.abs(actual - expected), initial=0.0))
    max_rel = relative_error(actual, expected)
    return Row(name, shape, max_abs, max_rel, tolerance, OK if max_rel <= tolerance else FAIL)


def check(golden, theirs, dtype="float32"):
    """Compares `theirs` with `golden`, stage by stage, in pipeline order.

    Args:
      golden: a golden `.npz` path (parity/golden.py) or an `Activations`.
      theirs: the same for the port: an `.npz` (or dict) of arrays under the stage names, any
        subset; a manifest and `inputs/...` are optional and checked when present.
      dtype: what the port computes in: "float32", "bfloat16", "float16" or "float64".
    Returns:
      `Report`.
    Raises:
      golden.GoldenError if a file cannot be read; ValueError for an unknown dtype.
    """
    if dtype not in STAGE_TOLERANCES:
        raise ValueError(f"check: dtype must be one of {sorted(STAGE_TOLERANCES)}, got {dtype!r}")
    tol = STAGE_TOLERANCES[dtype]
    gold, theirs = _as_activations(golden, "golden"), _as_activations(theirs, "theirs")
    sensitivity = (gold.manifest or {}).get("sensitivity", {})
    rows, missing = [], []
    for name in _order(gold):
        bound = tol.bound(sensitivity.get(name, 0.0))
        if name not in theirs.arrays:
            missing.append(name)
            rows.append(Row(name, tuple(np.shape(gold.arrays[name])), None, None, bound, MISSING))
            continue
        rows.append(compare_stage(name, gold.arrays[name], theirs.arrays[name], bound))
    extra = [n for n in theirs.stages if n not in gold.arrays]
    problems = []
    ours_cfg, their_cfg = (gold.manifest or {}).get("config"), (theirs.manifest or {}).get("config")
    if isinstance(ours_cfg, dict) and isinstance(their_cfg, dict):
        diffs = _config_differences(ours_cfg, their_cfg)
        if diffs:
            problems.append(f"a different config: {'; '.join(diffs)}")
    problems += _compare_inputs(gold, theirs)
    if not any(r.status != MISSING for r in rows):
        problems.append(f"no stage in common with the golden (theirs has {_short(theirs.stages) or 'no arrays'})")
    return Report(gold.source, theirs.source, dtype, tol.name, tuple(rows), tuple(missing), tuple(extra),
                  tuple(problems))
