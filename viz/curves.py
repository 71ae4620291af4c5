"""A fine-tuning run's curves: training loss, validation loss and metric, learning rate, by step.

    records = read_metrics("run/metrics.jsonl")     # the log `paligemma finetune` writes
    fig = figure(records, title="run")              # a matplotlib Figure (nothing global touched)
    plot_run("run/")                                # -> run/loss.png
    draw_quietly("run/", sys.stderr)                # the same, but only warns if it cannot

Training records are `{"step", "loss", "lr", ...}`, evaluations `{"step", "val_loss", <metric>,
...}` (fast/finetune.py). Every point drawn is a logged value, joined by straight lines: the
figure's lines carry exactly the log's numbers (the tests read them back).

Needs matplotlib: `pip install 'paligemma[viz]'` (`make install` includes it).
"""

import json
import os

INSTALL_HINT = "pip install 'paligemma[viz]' (matplotlib)"
# Evaluation fields that are bookkeeping, not a metric to draw.
_NOT_METRICS = ("step", "val_loss", "val_examples", "count", "invalid")


def read_metrics(path):
    """The records of a `metrics.jsonl`, in file order.

    Raises:
      ValueError naming `file:line` for a line that is not a JSON object with an integer "step".
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{number}: expected a JSON object with an integer \"step\"")
            records.append(record)
    return records


def series(records, key):
    """`(steps, values)` of the records that have a numeric `key`, in file order."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def metric_keys(records):
    """The validation metrics present (e.g. "exact_match", "cider"), in first-seen order."""
    keys = []
    for r in records:
        if "val_loss" in r:
            keys += [k for k, v in r.items() if k not in _NOT_METRICS and k not in keys
                     and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


def figure(records, title=""):
    """Three panels sharing the step axis: losses, validation metrics, learning rate.

    Lines are labelled "train loss", "val loss", each metric's name and "learning rate".
    Returns:
      `matplotlib.figure.Figure`.
    Raises:
      ImportError without matplotlib (see `INSTALL_HINT`).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 7.0), layout="constrained")
    loss_ax, metric_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        steps, values = series(records, key)
        if steps:
            loss_ax.plot(steps, values, style, label=label, markersize=4)
    loss_ax.set_ylabel("loss")
    for key in metric_keys(records):
        steps, values = series(records, key)
        metric_ax.plot(steps, values, "o-", label=key, markersize=4)
    metric_ax.set_ylabel("validation metric")
    steps, values = series(records, "lr")
    if steps:
        lr_ax.plot(steps, values, "-", label="learning rate", color="tab:gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    for ax in (loss_ax, metric_ax, lr_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    fig.suptitle(title or "training curves")
    return fig


def plot_run(run, out=None):
    """Draws `run/metrics.jsonl` into `out` (default `run/loss.png`), atomically. Returns the path.

    Raises:
      ValueError for a missing or bad log; ImportError without matplotlib.
    """
    log = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(log):
        raise ValueError(f"{run}: no metrics.jsonl (is it a `paligemma finetune` run folder?)")
    records = read_metrics(log)
    fig = figure(records, title=os.path.basename(os.path.abspath(run)))
    out = out or os.path.join(run, "loss.png")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def draw_quietly(run, stream):
    """`plot_run(run)`, but a failure only writes one warning line to `stream`; returns the path or None."""
    try:
        return plot_run(run)
    except ImportError:
        stream.write(f"paligemma: warning: loss.png not drawn: matplotlib is not installed; {INSTALL_HINT}\n")
    except Exception as e:  # noqa: BLE001 -- a picture must never stop a training run
        stream.write(f"paligemma: warning: loss.png not drawn: {type(e).__name__}: {' '.join(str(e).split())}\n")
    return None
