"""What a benchmark leaves behind: results.json (one row per run), headline.json, a text report with a
table per (workload, drafter) group (loads x policies x seeds) and the headline, and latency_vs_rate.png.

The tables and the plot put the load on a `rate` axis; a closed-loop row is shown there under the
workload `<workload> closed-loop` with its concurrency as the load (`shown`), so one table and one plot
serve both kinds of load (results.json keeps `rate` and `concurrency` apart). `smartspec simulate` uses
the same view."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from smartspec.bench.metrics import CONFIDENCE
from smartspec.bench.runner import POLICIES
from smartspec.bench.workload import Load

KEY = ("workload", "drafter", "policy", "rate", "concurrency", "seed")
CLOSED_LOOP = " closed-loop"


def check_rows(rows: Sequence[Mapping]) -> None:
    """Every row has its key fields (`concurrency` and `seed` may be absent: null), and no key repeats."""
    seen = set()
    for row in rows:
        key = tuple(row[k] if k in KEY[:4] else row.get(k) for k in KEY)
        if key in seen:
            raise ValueError(f"results repeat the key {dict(zip(KEY, key))}")
        seen.add(key)


def write_json(path: Path, data) -> None:
    """Writes atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def shown(rows: Sequence[Mapping]) -> list[dict]:
    """Rows as the tables and the plot read them: the load on `rate` (see the module's docstring)."""
    out = []
    for row in rows:
        if row.get("concurrency") is not None:
            out.append({**row, "workload": row["workload"] + CLOSED_LOOP, "rate": row["concurrency"]})
        else:
            out.append(dict(row))
    return out


def group_label(workload: str, drafter: str, controlled: bool) -> str:
    return f"{workload} / {drafter}" + (" [controlled acceptance]" if controlled else "")


def _groups(rows: Sequence[Mapping]) -> dict[tuple[str, str], list[Mapping]]:
    out: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        out.setdefault((row["workload"], row["drafter"]), []).append(row)
    return out


def _policy_order(policy: str) -> tuple[int, str]:
    return (POLICIES.index(policy), "") if policy in POLICIES else (len(POLICIES), policy)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _kdist(row: Mapping, top: int = 3) -> str:
    dist = row.get("k_distribution")
    if dist is None:
        return f"mean {row['mean_k']:.1f}" if row.get("mean_k") is not None else "-"
    if not dist:
        return "-"
    best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
    return " ".join(f"{k}:{share:.0%}" for k, share in sorted(best, key=lambda kv: int(kv[0])))


COLUMNS = (
    ("rate", 6), ("policy", 8), ("seed", 4), ("ok", 5), ("mean s", 7), ("p50 s", 7), ("p99 s", 7), ("TTFT s", 7), ("TPOT ms", 8),
    ("thru t/s", 8), ("good t/s", 8), ("acc/vfy", 7), ("k dist", 20), ("cost err", 8),
)


LEFT = ("policy", "k dist")  # left-aligned columns


def _line(cells: Sequence[str]) -> str:
    return " ".join(f"{c:<{w}}" if name in LEFT else f"{c:>{w}}" for c, (name, w) in zip(cells, COLUMNS))


def table(rows: Sequence[Mapping]) -> str:
    """One table per (workload, drafter) group: a line per rate (closed loop: concurrency, see `shown`),
    policy and seed."""
    out = []
    header = _line([name for name, _ in COLUMNS])
    for (workload, drafter), group in _groups(rows).items():
        controlled = bool(group[0].get("controlled"))
        out.append(f"== {group_label(workload, drafter, controlled)} ==")
        out.append(header)
        for row in sorted(group, key=lambda r: (r["rate"], _policy_order(r["policy"]), r.get("seed") or 0)):
            cells = [
                f"{row['rate']:g}", row["policy"], str(row.get("seed", "-")), f"{row['completed']}/{row['requests']}",
                _fmt(row["mean_latency_s"], ".2f"), _fmt(row["p50_latency_s"], ".2f"), _fmt(row["p99_latency_s"], ".2f"),
                _fmt(row["ttft_s"], ".3f"), _fmt(row["tpot_s"], ".1f", 1000), _fmt(row["throughput_tok_s"], ".1f"),
                _fmt(row["goodput_tok_s"], ".1f"), _fmt(row["mean_accepted"], ".2f"), _kdist(row),
                _fmt(row["cost_model_mape"], ".1%"),
            ]
            out.append(_line(cells))
            if row.get("failed"):
                out.append(f"       {row['failed']} failed: " + "; ".join(f"{n}x {e}" for e, n in row["errors"].items()))
        out.append("")
    out.append(
        "thru = tokens verified per second (generated + rejected drafts), good = generated tokens per second (goodput), "
        "acc/vfy = accepted draft tokens per verify (bonus token excluded), k dist = share of request-steps verifying k drafts, "
        "cost err = the router's step-time prediction error (MAPE)."
    )
    return "\n".join(out)


def _ratio(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """'0.97 [0.93, 1.01]', or '0.97' without an interval."""
    return _fmt(value, ".2f") + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def headline_text(entries: Sequence[Mapping]) -> str:
    """Per cell: goodput / best other and / none, every policy / goodput, and the fixed ks slower than none."""
    pct = round(CONFIDENCE * 100)
    lines = [
        "Headline: goodput-policy mean latency / best other policy's, and / no speculation's (below 1.0 = goodput is faster); "
        f"paired by seed: geometric means over seeds [{pct}% t-intervals]",
    ]
    for e in entries:
        tag = " [controlled]" if e["controlled"] else ""
        load = Load.of(e).label
        best = f"{_ratio(e['vs_best_other'], e.get('vs_best_other_low'), e.get('vs_best_other_high'))} (best other: {e['best_other_policy'] or '-'})"
        seeds = e.get("seeds", 1)
        lines.append(f"  {e['workload']} / {e['drafter']}{tag} {load}, {seeds} seed{'s' if seeds != 1 else ''}: "
                     f"vs best other {best}, vs none {_ratio(e['vs_none'], e.get('vs_none_low'), e.get('vs_none_high'))}")
        ratios = e.get("ratios") or {}
        if ratios:
            parts = [f"{name} {_ratio(r['ratio'], r['low'], r['high'])}" for name, r in sorted(ratios.items(), key=lambda kv: _policy_order(kv[0]))]
            lines.append(f"      policy / {e['policy']}: " + ", ".join(parts))
        for name in e.get("slower_than_none") or []:
            r = e["fixed_vs_none"][name]
            lines.append(f"      ** {name} is slower than none: {_ratio(r['ratio'], r['low'], r['high'])} (its {pct}% interval is above 1)")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping], path: Path) -> None:
    """Mean latency against rate, one line per policy, one subplot per (workload, drafter) group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = _groups(rows)
    n = max(len(groups), 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    policies = sorted({r["policy"] for r in rows}, key=_policy_order)
    cmap = plt.get_cmap("tab10")
    styles = {p: (cmap(i % 10), "o-" if p != "goodput" else "s-") for i, p in enumerate(policies)}
    for ax, ((workload, drafter), group) in zip(axes.flat, groups.items()):
        controlled = bool(group[0].get("controlled"))
        for policy in policies:
            by_load: dict[float, list[float]] = {}  # seeds of a load: their mean
            for r in group:
                if r["policy"] == policy and r["mean_latency_s"] is not None:
                    by_load.setdefault(r["rate"], []).append(r["mean_latency_s"])
            points = sorted((load, sum(values) / len(values)) for load, values in by_load.items())
            if points:
                color, style = styles[policy]
                ax.plot(*zip(*points), style, color=color, label=policy, linewidth=2.4 if policy == "goodput" else 1.3, markersize=4)
        rates = sorted({r["rate"] for r in group})
        if len(rates) > 1 and rates[-1] / rates[0] > 5:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_title(group_label(workload, drafter, controlled), fontsize=10)
        if group[0].get("concurrency") is not None:  # closed-loop rows carry their concurrency on the rate axis
            ax.set_xlabel("concurrency (requests in the system)")
        else:
            ax.set_xlabel("rate (requests/s)" + (", trace mean" if group[0].get("trace") else ""))
        ax.set_ylabel("mean latency (s)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = sorted(legend, key=_policy_order)
    handles = [legend[label] for label in labels]
    ncol = max(1, min(len(labels), 4 * cols))  # a narrow figure wraps its legend instead of cutting it
    legend_rows = math.ceil(len(labels) / ncol)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * max(legend_rows, 1) / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
