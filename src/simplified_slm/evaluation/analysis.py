"""Training analysis: pivot `metrics.csv`, plot the curves, compare runs.

`metrics.csv` is long form (`step,name,value,time`, append-only), so reading it means
pivoting: one (steps, values) series per metric name. A resumed run may log a step twice;
the later row wins, as it came from the run that carried on.

Plots use matplotlib's object API (`matplotlib.figure.Figure`), never pyplot, so calling
this from `slm run`, a notebook or a thread does not touch any global backend state.
matplotlib is optional (a dev extra): without it the functions raise one clear SLMError.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from simplified_slm import metric_names as M
from simplified_slm.errors import SLMError

Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step

_DPI = 120


# ------------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> tuple[dict[str, Series], tuple[float, float] | None]:
    """Pivot a long-form metrics.csv into {name: (steps, values)} plus the (first, last) time.

    Rows that do not parse (the half-written last line of a killed run) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise SLMError(f"no metrics file at {path}; pass a run folder written by slm train/slm run")
    table: dict[str, dict[int, float]] = {}
    times: list[float] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or header[:3] != ["step", "name", "value"]:
            raise SLMError(f"{path} is not a long-form metrics file (header step,name,value,time); "
                           "pass a run folder written by slm train")
        for row in reader:
            try:
                step, name, value = int(row[0]), row[1], float(row[2])
                if len(row) > 3 and row[3]:
                    times.append(float(row[3]))
            except (IndexError, ValueError):
                continue
            table.setdefault(name, {})[step] = value
    series = {}
    for name, points in table.items():
        steps = np.array(sorted(points), dtype=np.int64)
        series[name] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return series, (min(times), max(times)) if times else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


@dataclass
class RunData:
    run_dir: Path
    name: str
    series: dict[str, Series]
    time_span: tuple[float, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # run.json
    eval: dict[str, Any] = field(default_factory=dict)  # eval.json of `slm run`, if any

    def get(self, name: str) -> Series | None:
        s = self.series.get(name)
        return s if s is not None and len(s[0]) else None

    def tokens_at(self, steps: np.ndarray) -> np.ndarray:
        """Training tokens seen by `steps` (from the logged train/tokens; linear past the last log)."""
        logged = self.get(M.TRAIN_TOKENS)
        if logged is None:
            raise SLMError(f"{self.run_dir}/metrics.csv has no train/tokens metric to plot against")
        xs = np.concatenate([[0], logged[0]]).astype(np.float64)
        ys = np.concatenate([[0.0], logged[1]])
        out = np.interp(steps, xs, ys)
        beyond = steps > xs[-1]
        if beyond.any() and xs[-1] > 0:
            out[beyond] = np.asarray(steps, dtype=np.float64)[beyond] * ys[-1] / xs[-1]
        return out


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SLMError(f"run folder {run_dir} does not exist; pass the output_dir of a training run")
    series, span = read_metrics(run_dir / "metrics.csv")
    info = _read_json(run_dir / "run.json")
    name = (info.get("config") or {}).get("run_name") or run_dir.name
    return RunData(run_dir, name, series, span, info, _read_json(run_dir / "eval.json"))


# ------------------------------------------------------------------------- summary
def summarize(run: RunData) -> dict[str, Any]:
    """One row of the comparison table (None where the run did not log the number)."""
    def last(name: str) -> float | None:
        s = run.get(name)
        return float(s[1][-1]) if s is not None else None

    row: dict[str, Any] = {"run": run.name, "run_dir": str(run.run_dir), "family": run.info.get("family"),
                           "params": run.info.get("num_parameters") or run.eval.get("num_parameters")}
    steps = [int(s[0][-1]) for s in run.series.values() if len(s[0])]
    row["steps"] = max(steps) if steps else 0
    row["tokens"] = int(last(M.TRAIN_TOKENS)) if last(M.TRAIN_TOKENS) is not None else None
    row["final_train_loss"] = last(M.TRAIN_LOSS)
    val = run.get(M.VAL_LOSS)
    row["final_val_loss"] = float(val[1][-1]) if val is not None else None
    row["best_val_loss"] = float(val[1].min()) if val is not None else None
    row["best_val_step"] = int(val[0][val[1].argmin()]) if val is not None else None
    bpb = run.get(M.VAL_BPB)
    row["final_val_bpb"] = float(bpb[1][-1]) if bpb is not None else None
    row["best_val_bpb"] = float(bpb[1].min()) if bpb is not None else None
    row["train_bytes_per_s"] = _train_bytes_per_s(run)
    # H-Net: each stage's own ratio (its inputs per selected chunk), outermost first
    stages = sorted((int(m.group(1)), name.replace("bytes_per_chunk", "compression"))
                    for name in run.series if (m := M.HNET_BYTES_PER_CHUNK_PATTERN.match(name)))
    ratios = [last(name) for _, name in stages]
    row["compression"] = " / ".join(f"{r:.2f}" for r in ratios if r is not None) or None
    # eval.json (slm run: the whole validation split) counts only if it evaluated this run's
    # last step; a run resumed and trained on afterwards has a stale one
    current = run.eval.get("train_steps") == row["steps"]
    row["eval_bpb"] = (run.eval.get("metrics") or {}).get("bpb") if current else None
    if current and run.eval.get("wall_time_s") is not None:
        row["wall_s"], row["wall_source"] = float(run.eval["wall_time_s"]), "eval.json (train + eval)"
    elif run.time_span is not None:
        row["wall_s"] = round(run.time_span[1] - run.time_span[0], 1)
        row["wall_source"] = "metrics.csv (first to last log)"
    else:
        row["wall_s"], row["wall_source"] = None, None
    return row


def _train_bytes_per_s(run: RunData) -> float | None:
    """Median logged training tokens/s times the prepared training split's bytes per token."""
    speed = run.get(M.TRAIN_TOKENS_PER_S)
    split = (_read_json(run.run_dir / "data" / "meta.json").get("splits") or {}).get("train") or {}
    if speed is None or not split.get("tokens"):
        return None
    return float(np.median(speed[1])) * split["bytes"] / split["tokens"]


_COLUMNS = [("run", "run", "{}"), ("family", "family", "{}"), ("params", "params", "{:,}"),
            ("steps", "steps", "{:,}"), ("tokens", "tokens", "{:,}"),
            ("train_bytes_per_s", "train bytes/s", "{:,.0f}"), ("compression", "compression per stage", "{}"),
            ("final_val_loss", "final val loss", "{:.4f}"), ("best_val_loss", "best val loss", "{:.4f}"),
            ("final_val_bpb", "final val BPB", "{:.4f}"), ("best_val_bpb", "best val BPB", "{:.4f}"),
            ("eval_bpb", "eval BPB (full val)", "{:.4f}"), ("wall_s", "wall s", "{:,.1f}")]


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" if key in ("run", "family") else "---:" for key, _, _ in _COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "—" for key, _, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Loss is nats per token (comparable only between runs with the same tokenizer); "
             "BPB is bits per UTF-8 byte (comparable across tokenizers). \"val\" columns come from the "
             "periodic evals in metrics.csv (train.eval_batches batches); \"eval BPB\" from eval.json "
             "(the whole validation split, `slm run` only). \"train bytes/s\": median logged tokens/s times the "
             "training split's bytes per token; \"compression per stage\": each H-Net stage's inputs per "
             "selected chunk at the last log, outermost first."]
    return "\n".join(lines + notes) + "\n"


# ------------------------------------------------------------------------- plotting
def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SLMError("plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    fig = Figure(figsize=(width * ncols, height), dpi=_DPI, layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    return fig, axes


_LOG_MIN_DECADES = 0.7  # log y only when the data spans more than a factor of 5


def _y_axis(ax: Any, label: str, values: Iterable[np.ndarray]) -> None:
    """Label the y axis; use a log scale (with plain-number ticks) when the positive data
    spans a wide range, where it shows both the early drop and the late progress."""
    from matplotlib.ticker import FuncFormatter

    data = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values] or [np.zeros(0)])
    data = data[np.isfinite(data)]
    wide = (data.size and data.min() > 0 and math.log10(data.max() / data.min()) > _LOG_MIN_DECADES)
    if not wide:
        ax.set_ylabel(label)
        return

    def minor(value: float, _: Any) -> str:
        lo, hi = ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 99.0
        digit = round(value / 10 ** math.floor(math.log10(value) + 1e-9)) if value > 0 else 0
        if decades < 0.5 or (decades < 1.2 and digit in (2, 3, 5)):
            return f"{value:g}"
        return ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_ylabel(f"{label} (log scale)")


def _steps_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("optimizer step")


def _tokens_x(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500, 20k, 1.5M


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _bytes_per_token(run: RunData) -> float | None:
    """UTF-8 bytes per token of the validation text (loss / (ln 2 * BPB) at each eval)."""
    loss, bpb = run.get(M.VAL_LOSS), run.get(M.VAL_BPB)
    if loss is None or bpb is None:
        return None
    common, i, j = np.intersect1d(loss[0], bpb[0], return_indices=True)
    ratios = loss[1][i] / (math.log(2) * np.maximum(bpb[1][j], 1e-12))
    return float(np.median(ratios)) if len(common) else None


def _curve_pair(run: RunData, out: Path, title: str, ylabel: str,
                curves: list[tuple[str, Series, dict[str, Any]]]) -> Path:
    fig, (ax_step, ax_tok) = _figure(2)
    has_tokens = run.get(M.TRAIN_TOKENS) is not None
    for label, (steps, values), style in curves:
        ax_step.plot(steps, values, label=label, **style)
        if has_tokens:
            ax_tok.plot(run.tokens_at(steps), values, label=label, **style)
    _steps_x(ax_step)
    ax_tok.set_xlabel("training tokens" if has_tokens else "training tokens (not logged)")
    for ax in (ax_step, ax_tok):
        _y_axis(ax, ylabel, [values for _, (_, values), _ in curves])
        ax.legend(loc="best")
    _tokens_x(ax_tok)
    fig.suptitle(f"{title}: {run.name}")
    return _save(fig, out)


_TRAIN_STYLE = {"color": "tab:blue", "linewidth": 1.0, "alpha": 0.8}
_VAL_STYLE = {"color": "tab:orange", "marker": "o", "markersize": 4, "linewidth": 1.8}


def plot_loss(run: RunData, out_dir: Path) -> Path | None:
    curves = []
    if run.get(M.TRAIN_LOSS) is not None:
        curves.append(("train", run.get(M.TRAIN_LOSS), _TRAIN_STYLE))
    if run.get(M.VAL_LOSS) is not None:
        curves.append(("validation", run.get(M.VAL_LOSS), _VAL_STYLE))
    if not curves:
        return None
    return _curve_pair(run, out_dir / "loss.png", "Loss", "cross-entropy (nats/token)", curves)


def plot_bpb(run: RunData, out_dir: Path) -> Path | None:
    val = run.get(M.VAL_BPB)
    if val is None:
        return None
    curves = []
    bpt, train = _bytes_per_token(run), run.get(M.TRAIN_LOSS)
    if bpt and train is not None:
        est = train[1] / (math.log(2) * bpt)
        curves.append(("train (estimated: train loss / val bytes per token)", (train[0], est),
                       {**_TRAIN_STYLE, "linestyle": "--"}))
    curves.append(("validation", val, _VAL_STYLE))
    return _curve_pair(run, out_dir / "bpb.png", "Bits per byte", "bits per UTF-8 byte", curves)


def plot_lr(run: RunData, out_dir: Path) -> Path | None:
    lr = run.get(M.TRAIN_LR)
    if lr is None:
        return None
    fig, (ax,) = _figure(1)
    ax.plot(lr[0], lr[1], color="tab:green", linewidth=1.5)
    _steps_x(ax)
    ax.set_ylabel("learning rate")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.set_ylim(bottom=0)
    ax.set_title(f"Learning rate schedule: {run.name}")
    return _save(fig, out_dir / "lr.png")


def plot_grad_norm(run: RunData, out_dir: Path) -> Path | None:
    total = run.get(M.TRAIN_GRAD_NORM)
    groups = {m.group(1): run.series[name] for name in sorted(run.series)
              if (m := M.GRAD_NORM_PATTERN.match(name)) and m.group(1) != "global"}
    if total is None and not groups:
        return None
    fig, axes = _figure(2 if groups else 1)
    ax = axes[0]
    if total is not None:
        ax.plot(total[0], total[1], color="tab:red", linewidth=1.2, label="global (before clipping)")
    clip = ((run.info.get("config") or {}).get("train") or {}).get("grad_clip")
    if clip:
        ax.axhline(clip, color="black", linestyle=":", linewidth=1.2, label=f"clip threshold {clip:g}")
    _y_axis(ax, "gradient L2 norm", [total[1]] if total is not None else [])
    _steps_x(ax)
    ax.set_title("Global gradient norm")
    ax.legend(loc="best")
    if groups:
        gax = axes[1]
        colors = _colors(len(groups))
        for color, (group, (steps, values)) in zip(colors, sorted(groups.items(), key=lambda kv: _group_key(kv[0]))):
            gax.plot(steps, values, color=color, linewidth=1.2, label=group)
        _y_axis(gax, "gradient L2 norm", [v for _, v in groups.values()])
        _steps_x(gax)
        gax.set_title("Gradient norm by parameter group")
        gax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                   ncol=2 if len(groups) > 16 else 1, title="group")
    fig.suptitle(f"Gradient norms: {run.name}")
    return _save(fig, out_dir / "grad_norm.png")


def _group_key(group: str) -> tuple[int, int, str]:
    m = re.match(r"layer(\d+)$", group)
    if group == "embeddings":
        return (0, 0, group)
    if m:
        return (1, int(m.group(1)), group)
    return (2 if group == "head" else 3, 0, group)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(1, n - 1)) if n > 10 else cmap(i) for i in range(n)]


def plot_ternary(run: RunData, out_dir: Path) -> Path | None:
    """Left: shares of -1/0/+1 codes over all BitLinear weights; right: zero share per layer."""
    modules: dict[str, dict[str, Series]] = {}
    for name, s in run.series.items():
        m = M.TERNARY_PATTERN.match(name)
        if m:
            modules.setdefault(m.group(1), {})[m.group(2)] = s
    layers = sorted(k for k, v in modules.items() if k != "all" and "zero" in v)
    if not layers and "all" not in modules:
        return None
    fig, (ax, hax) = _figure(2, width=6.5)
    overall = modules.get("all")
    if overall and all(k in overall for k in ("neg", "zero", "pos")):
        steps = overall["zero"][0]
        shares = [np.interp(steps, *overall[k]) for k in ("neg", "zero", "pos")]
        title = "all BitLinear weights"
    else:  # no global numbers logged: average the layers
        steps = modules[layers[0]]["zero"][0]
        shares = [np.mean([np.interp(steps, *modules[layer][k]) for layer in layers], axis=0)
                  for k in ("neg", "zero", "pos")]
        title = "mean over BitLinear layers"
    ax.stackplot(steps, *shares, labels=["−1", "0", "+1"], colors=["tab:blue", "0.75", "tab:red"], alpha=0.85)
    ax.set_ylim(0, 1)
    if len(steps) > 1:
        ax.set_xlim(steps[0], steps[-1])
    _steps_x(ax)
    ax.set_ylabel("share of ternary codes")
    ax.set_title(f"Code distribution ({title})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="code", reverse=True)
    if layers:
        grid_steps = np.unique(np.concatenate([modules[layer]["zero"][0] for layer in layers]))
        grid = np.array([np.interp(grid_steps, *modules[layer]["zero"]) for layer in layers])
        lo, hi = float(grid.min()), float(grid.max())
        pad = max(0.0, 0.1 - (hi - lo)) / 2  # colour range of at least 0.1 so noise is not blown up
        lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
        image = hax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=lo, vmax=hi,
                           extent=(grid_steps[0], grid_steps[-1], len(layers) - 0.5, -0.5))
        hax.set_yticks(range(len(layers)))
        hax.set_yticklabels(layers, fontsize=max(4, min(8, int(240 / len(layers)))))
        _steps_x(hax)
        hax.set_title("Share of zero codes per BitLinear layer")
        hax.grid(False)
        fig.colorbar(image, ax=hax, label="share of 0 codes")
    else:
        hax.set_axis_off()
    fig.suptitle(f"Ternary weights: {run.name}")
    return _save(fig, out_dir / "ternary.png")


def plot_hnet(run: RunData, out_dir: Path) -> Path | None:
    stages = sorted((int(m.group(1)), name) for name in run.series if (m := M.HNET_BYTES_PER_CHUNK_PATTERN.match(name)))
    if not stages:
        return None
    fig, (ax,) = _figure(1)
    for stage, name in stages:
        steps, values = run.series[name]
        ax.plot(steps, values, marker=".", linewidth=1.5, label=f"stage {stage}")
    _steps_x(ax)
    ax.set_ylabel("bytes per chunk (compression ratio)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"H-Net dynamic chunking: {run.name}")
    ax.legend(loc="best")
    return _save(fig, out_dir / "hnet_compression.png")


def plot_comparison(runs: Sequence[RunData], out_dir: Path) -> Path | None:
    """Validation BPB (loss when BPB is missing) of several runs vs step and vs tokens."""
    metric = M.VAL_BPB if all(r.get(M.VAL_BPB) is not None for r in runs) else M.VAL_LOSS
    present = [r for r in runs if r.get(metric) is not None]
    if len(present) < 2:
        return None
    fig, (ax_step, ax_tok) = _figure(2)
    for color, run in zip(_colors(len(present)), present):
        steps, values = run.get(metric)
        style = {"color": color, "marker": "o", "markersize": 3, "linewidth": 1.5, "label": run.name}
        ax_step.plot(steps, values, **style)
        if run.get(M.TRAIN_TOKENS) is not None:
            ax_tok.plot(run.tokens_at(steps), values, **style)
    ylabel = "validation bits per byte" if metric == M.VAL_BPB else "validation loss (nats/token)"
    _steps_x(ax_step)
    ax_tok.set_xlabel("training tokens")
    for ax in (ax_step, ax_tok):
        _y_axis(ax, ylabel, [r.get(metric)[1] for r in present])
        ax.legend(loc="best", fontsize="small")
    _tokens_x(ax_tok)
    fig.suptitle(f"Run comparison: {ylabel}")
    return _save(fig, out_dir / "compare_val.png")


# ------------------------------------------------------------------------- entry points
def analyze_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Plots of the first run, the comparison table of all, and a compare plot when several.

    Writes into `out_dir` (default `<first run>/plots`): loss.png, bpb.png, lr.png,
    grad_norm.png, ternary.png / hnet_compression.png when those metrics exist,
    comparison.md, comparison.json, and compare_val.png for two or more runs. Returns
    {"plots": [paths], "table": path, "json": path, "rows": [...]}.
    """
    if not run_dirs:
        raise SLMError("no run folder given; pass --run_dir DIR")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # equal run names (same config) would make the legend ambiguous
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.run_dir.name})"
    main = runs[0]
    out = Path(out_dir) if out_dir is not None else main.run_dir / "plots"
    plots = [p for p in (plot_loss(main, out), plot_bpb(main, out), plot_lr(main, out),
                         plot_grad_norm(main, out), plot_ternary(main, out), plot_hnet(main, out),
                         plot_comparison(runs, out)) if p is not None]
    rows = [summarize(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    table = out / "comparison.md"
    table.write_text(comparison_markdown(rows), encoding="utf-8")
    table_json = out / "comparison.json"
    table_json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return {"plots": [str(p) for p in plots], "table": str(table), "json": str(table_json), "rows": rows}


def analyze_after_run(run_dir: str | Path, say: Callable[[str], None] = print,
                      compare: Iterable[str | Path] = ()) -> dict[str, Any] | None:
    """For `slm run`: write `<run_dir>/plots`; a missing matplotlib or a plotting problem
    is reported in one line and never fails a finished training run."""
    try:
        result = analyze_runs([run_dir, *compare])
    except SLMError as err:
        say(f"note: no plots ({err})")
        return None
    say(f"plots: {Path(result['table']).parent} ({len(result['plots'])} figures, comparison.md)")
    return result
