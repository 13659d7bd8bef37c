"""The demo's report: per-phase figures from the step records, as JSON, markdown and a PNG plot (pure, no I/O
beyond writing the files it is asked to)."""

import json
from pathlib import Path

from pydantic import BaseModel

from tide_sglang.engine.serve import PhaseSummary, StepRecord, phase_summaries


class Swap(BaseModel):
    t: float
    version: int


class DemoSummary(BaseModel):
    phases: list[PhaseSummary]
    swaps: list[Swap]
    total_tokens: int
    total_seconds: float
    published: list[int]
    interrupted: bool


def summarize(records: list[StepRecord], published: list[int], interrupted: bool) -> DemoSummary:
    phases = phase_summaries(records)
    swaps, version = [], 0
    for r in records:
        if r.draft_version != version:
            swaps.append(Swap(t=round(r.t, 3), version=r.draft_version))
            version = r.draft_version
    return DemoSummary(phases=phases, swaps=swaps, total_tokens=sum(r.emitted for r in records),
                       total_seconds=round(records[-1].t, 3) if records else 0.0, published=published,
                       interrupted=interrupted)


def windows(records: list[StepRecord], width_s: float) -> list[tuple[float, float, float]]:
    """(t, tokens/s, acceptance length) over consecutive windows of `width_s` seconds."""
    out, bucket, edge = [], [], width_s
    for r in records:
        while r.t > edge:
            if bucket:
                tokens, steps = sum(b.emitted for b in bucket), sum(b.batch_size for b in bucket)
                out.append((edge - width_s / 2, tokens / width_s, tokens / steps))
            bucket, edge = [], edge + width_s
        bucket.append(r)
    return out


def plot(records: list[StepRecord], summary: DemoSummary, path: Path, width_s: float = 5.0) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    series = windows(records, width_s)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    if series:
        t, tps, acc = zip(*series, strict=True)
        ax1.plot(t, acc, color="tab:blue", marker=".", lw=1.2)
        ax2.plot(t, tps, color="tab:green", marker=".", lw=1.2)
    ax1.set_ylabel("acceptance length\n(tokens / verify)")
    ax2.set_ylabel("tokens / s")
    ax2.set_xlabel("seconds")
    boundaries = [(p.start, p.phase) for p in summary.phases]
    for ax in (ax1, ax2):
        for x, _ in boundaries[1:]:
            ax.axvline(x, color="grey", ls="--", lw=1)
        for s in summary.swaps:
            ax.axvline(s.t, color="tab:red", ls=":", lw=1.2)
        ax.grid(alpha=0.3)
    for x, name in boundaries:
        ax1.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
                     textcoords="offset points", fontsize=9, color="grey")
    for s in summary.swaps:
        ax2.annotate(f"v{s.version}", (s.t, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -12),
                     textcoords="offset points", fontsize=8, color="tab:red")
    ax1.set_title("TIDE demo: phases (grey dashes) and draft hot swaps (red dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: DemoSummary, settings: dict[str, object]) -> str:
    lines = ["# TIDE demo report", "", f"{summary.total_tokens} tokens in {summary.total_seconds:.0f} s; "
             f"published versions: {summary.published or 'none'}; swaps: "
             + (", ".join(f"v{s.version} at {s.t:.0f} s" for s in summary.swaps) or "none")
             + (" (interrupted)" if summary.interrupted else ""), "",
             "| phase | domain | seconds | tokens | tokens/s | acceptance length | speculative steps | versions |",
             "|---|---|---|---|---|---|---|---|"]
    for p in summary.phases:
        lines.append(f"| {p.phase} | {p.domain} | {p.seconds:.0f} | {p.tokens} | {p.tokens_per_s:.1f} | "
                     f"{p.accept_length:.2f} | {p.speculative_share:.0%} | {p.versions or '-'} |")
    lines += ["", "![acceptance length and tokens/s](plot.png)", "", "Settings:", "",
              "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, records: list[StepRecord], published: list[int], interrupted: bool,
                 settings: dict[str, object]) -> DemoSummary:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, published, interrupted)
    (out / "report.json").write_text(json.dumps({
        "summary": summary.model_dump(), "settings": settings,
        "steps": [r.model_dump() for r in records]}, default=str) + "\n")
    plot(records, summary, out / "plot.png")
    (out / "report.md").write_text(markdown(summary, settings))
    return summary
