"""What ``intermail load`` measured, and how it is shown: latency table, errors, JSON, plot.

Owns: :class:`Recorder` (every command's latency, every transaction's
outcome, errors counted by reply code, and one-second buckets for the
time series), the percentiles (nearest rank), the human report, the JSON
report and the ``--plot`` figure (matplotlib, Agg backend, from the
``plots`` extra -- :func:`plot_available` says whether it is there).

A *transaction* is one SMTP message (MAIL to the 250 after the dot), one
IMAP session or one POP3 session (connect to the end of LOGOUT/QUIT); a
*command* is one request/reply inside it (``smtp MAIL``, ``imap SELECT``),
timed from the write to the whole reply.

Logs: nothing (returns text and dicts; the caller prints).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

KINDS = ("smtp", "imap", "pop3")
TRANSACTION_NAMES = {"smtp": "message", "imap": "session", "pop3": "session"}
PLOTS_HINT = "--plot needs matplotlib: pip install 'intermail[plots]' (or pip install matplotlib)"


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list (q in 0..1)."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def latency_figures(values: list[float]) -> dict[str, Any]:
    """count, p50, p90, p99, max of ``values`` (seconds) in milliseconds, 3 decimals."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {"count": len(ordered), **{f"p{round(q * 100)}": round(percentile(ordered, q) * 1000, 3)
                                      for q in (0.5, 0.9, 0.99)},
            "max": round(ordered[-1] * 1000, 3)}


@dataclass
class _Second:
    """One second of the run: transactions done and failed per kind, their latencies."""

    ok: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class Recorder:
    """Everything the load saw, as it happens (one event loop: no locking)."""

    SAMPLES_PER_ERROR = 3

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.commands: dict[str, list[float]] = defaultdict(list)
        self.ok: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: Counter = Counter()
        self.samples: dict[str, list[str]] = defaultdict(list)
        self.seconds: dict[int, _Second] = defaultdict(_Second)
        self.ended: float | None = None

    @property
    def done(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values())

    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    def _bucket(self) -> _Second:
        return self.seconds[int(self.clock() - self.started)]

    def command(self, name: str, seconds: float) -> None:
        self.commands[name].append(seconds)

    def transaction(self, kind: str, seconds: float) -> None:
        """A transaction of ``kind`` that went through, in ``seconds``."""
        self.ok[kind] += 1
        self.commands[f"{kind} {TRANSACTION_NAMES[kind]}"].append(seconds)
        bucket = self._bucket()
        bucket.ok[kind] += 1
        bucket.latencies[kind].append(seconds)

    def error(self, kind: str, key: str, sample: str) -> None:
        """A transaction of ``kind`` that failed; ``key`` is its reply code (``smtp 451``, ``imap NO``)."""
        self.failed[kind] += 1
        self.errors[key] += 1
        if len(self.samples[key]) < self.SAMPLES_PER_ERROR and sample not in self.samples[key]:
            self.samples[key].append(sample[:300])
        self._bucket().failed[kind] += 1

    def finish(self) -> None:
        self.ended = self.clock()

    # -- the report -------------------------------------------------------------------

    def timeline(self) -> list[dict[str, Any]]:
        """Per second: transactions done and failed per kind, p50 and p99 of their latency (ms).

        ``width`` is the part of the second the run lasted (less than 1 for the last one only).
        """
        rows = []
        last = int(self.elapsed()) if self.seconds else -1
        for second in range(last + 1):
            bucket = self.seconds.get(second) or _Second()
            row: dict[str, Any] = {"t": second, "width": round(min(1.0, self.elapsed() - second), 3)}
            for kind in KINDS:
                if not (bucket.ok[kind] or bucket.failed[kind] or self.ok[kind] or self.failed[kind]):
                    continue
                ordered = sorted(bucket.latencies.get(kind, []))
                row[kind] = {"ok": bucket.ok[kind], "failed": bucket.failed[kind],
                             "p50": round(percentile(ordered, 0.5) * 1000, 3) if ordered else None,
                             "p99": round(percentile(ordered, 0.99) * 1000, 3) if ordered else None}
            rows.append(row)
        return rows

    def _command_order(self) -> list[str]:
        """Commands by protocol, in the order they first ran, each transaction's total last."""
        def key(item: tuple[int, str]) -> tuple[int, bool, int]:
            first_seen, name = item
            kind, _, command = name.partition(" ")
            rank = KINDS.index(kind) if kind in KINDS else len(KINDS)
            return rank, command == TRANSACTION_NAMES.get(kind), first_seen
        return [name for _, name in sorted(enumerate(self.commands), key=key)]

    def summary(self) -> dict[str, Any]:
        seconds = self.elapsed()
        return {
            "seconds": round(seconds, 3),
            "transactions": {kind: {"ok": self.ok[kind], "failed": self.failed[kind],
                                    "per_second": round(self.ok[kind] / seconds, 2) if seconds > 0 else None}
                             for kind in KINDS if self.ok[kind] or self.failed[kind]},
            "latency_ms": {name: latency_figures(self.commands[name]) for name in self._command_order()},
            "errors": dict(self.errors.most_common()),
            "error_samples": {key: list(samples) for key, samples in self.samples.items()},
            "timeline": self.timeline(),
        }


# -- the human report ---------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_text(report: dict[str, Any]) -> str:
    """The report as an operator reads it: throughput, the latency table, errors, verification."""
    lines = [(f"intermail load {report['mode']}: run {report['run']}, {report['seconds']:.1f} s, "
              f"concurrency {report['params']['concurrency']}, {report['params']['users']} users")]
    for kind, t in report["transactions"].items():
        unit = "messages" if kind == "smtp" else "sessions"
        lines.append(f"  {kind:<5} {t['ok']:>8} {unit} ok, {t['failed']:>6} failed, {t['per_second'] or 0:>9.1f}/s")
    lines.append("")
    width = max([len("command")] + [len(n) for n in report["latency_ms"]])
    lines.append(f"  {'command':<{width}} {'count':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, f in report["latency_ms"].items():
        lines.append(f"  {name:<{width}} {f['count']:>8} {_ms(f['p50']):>9} {_ms(f['p90']):>9} "
                     f"{_ms(f['p99']):>9} {_ms(f['max']):>9}")
    lines.append("")
    if report["errors"]:
        lines.append("  errors by reply code:")
        for key, count in report["errors"].items():
            sample = report["error_samples"].get(key, [""])[0]
            lines.append(f"    {key:<28} {count:>7}   e.g. {sample[:100]}")
    else:
        lines.append("  errors: none")
    verify = report.get("verify")
    if verify:
        lines.append("")
        lines.append(f"  verify over IMAP: {verify['accepted']} accepted, {verify['found']} found once, "
                     f"{verify['lost']} lost, {verify['doubled']} doubled"
                     f" (settled in {verify['settle_seconds']:.1f} s{'' if verify['settled'] else ', gave up'})")
        if verify["unconfirmed"]:
            lines.append(f"    {verify['unconfirmed']} sent without a final reply (connection lost after the "
                         f"body): {verify['unconfirmed_delivered']} of them delivered")
        if verify["delivered_after_refusal"]:
            lines.append(f"    {verify['delivered_after_refusal']} delivered although refused")
        for what in ("lost_tokens", "doubled_tokens"):
            if verify[what]:
                lines.append(f"    {what.replace('_', ' ')}: {', '.join(verify[what][:10])}")
        lines.append(f"lost {verify['lost']} doubled {verify['doubled']}")
    if report.get("plot"):
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)


# -- the plot ---------------------------------------------------------------------------


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(report: dict[str, Any], path: str) -> None:
    """Throughput (per second, per kind, failures dashed) and latency p50/p99 over time, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    timeline = report["timeline"]
    figure, (rate_axes, latency_axes) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = {"smtp": "tab:blue", "imap": "tab:green", "pop3": "tab:orange"}
    for kind in KINDS:
        points = [(row["t"], row[kind]) for row in timeline if kind in row]
        if not points:
            continue
        widths = {row["t"]: max(row.get("width", 1.0), 0.05) for row in timeline}
        seconds = [t + widths[t] / 2 for t, _ in points]
        unit = "messages/s" if kind == "smtp" else "sessions/s"
        rate_axes.plot(seconds, [p["ok"] / widths[t] for t, p in points], color=colours[kind], label=f"{kind} {unit}")
        if any(p["failed"] for _, p in points):
            rate_axes.plot(seconds, [p["failed"] / widths[t] for t, p in points], color=colours[kind], linestyle="--",
                           label=f"{kind} failed/s")
        for q, style in (("p50", "-"), ("p99", ":")):
            pts = [(s, p[q]) for s, (_, p) in zip(seconds, points) if p[q] is not None]
            if pts:
                latency_axes.plot([s for s, _ in pts], [v for _, v in pts], color=colours[kind], linestyle=style,
                                  label=f"{kind} {TRANSACTION_NAMES[kind]} {q}")
    rate_axes.set_ylabel("per second")
    rate_axes.set_title(f"intermail load {report['mode']} (run {report['run']}, concurrency "
                        f"{report['params']['concurrency']}): throughput")
    rate_axes.grid(True, alpha=0.3)
    rate_axes.legend(loc="best", fontsize="small")
    latency_axes.set_ylabel("latency, ms")
    latency_axes.set_xlabel("seconds since start")
    latency_axes.set_title("latency per transaction (p50 solid, p99 dotted)")
    if any(line.get_ydata().size for line in latency_axes.get_lines()):
        latency_axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        latency_axes.yaxis.set_major_formatter(plain)
        latency_axes.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        latency_axes.legend(loc="best", fontsize="small")
    latency_axes.grid(True, alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
