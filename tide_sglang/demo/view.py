"""The demo's live `rich` view: what an operator would watch on a dashboard, in the terminal."""

import subprocess
import time
from collections import deque
from typing import Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tide_sglang.engine.serve import StepRecord
from tide_sglang.stream import StreamWriter
from tide_sglang.stream.reader import group_lag
from tide_sglang.workloads import PhasePlan

WINDOW_S = 5.0


class LiveView:
    def __init__(self, console: Console, plans: list[PhasePlan], writer: StreamWriter, client: redis.Redis,
                 promoter: Any, trainer: subprocess.Popen[bytes]) -> None:
        self.console, self.writer, self.client = console, writer, client
        self.promoter, self.trainer = promoter, trainer
        self.phases = [p.phase.name for p in plans]
        self.recent: deque[StepRecord] = deque()
        self.last: StepRecord | None = None
        self.lag: int | None = None
        self._lag_at = 0.0
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> "LiveView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def update(self, record: StepRecord) -> None:
        self.last = record
        self.recent.append(record)
        while self.recent and self.recent[0].t < record.t - WINDOW_S:
            self.recent.popleft()
        if time.monotonic() - self._lag_at > 1.0:
            self._lag_at = time.monotonic()
            self.lag = self._stream_lag()
        self.live.update(self._render())

    def _stream_lag(self) -> int | None:
        try:
            return group_lag(self.client, self.writer.stream)
        except redis.RedisError:
            return None

    def _render(self) -> Table:
        table = Table(title="TIDE demo — online draft adaptation", show_header=False, min_width=60)
        table.add_column(style="bold")
        table.add_column()
        r, window = self.last, list(self.recent)
        span = (window[-1].t - window[0].t) if len(window) > 1 else 0.0
        tokens = sum(x.emitted for x in window[1:])
        steps = sum(x.batch_size for x in window)
        s = self.writer.stats
        alive = self.trainer.poll() is None
        table.add_row("phase", f"{r.phase} ({r.domain})  [{self.phases.index(r.phase) + 1}/{len(self.phases)}]"
                      if r else "starting")
        table.add_row("tokens/s", f"{tokens / span:.1f}" if span else "-")
        table.add_row("acceptance length", f"{sum(x.emitted for x in window) / steps:.2f}" if steps else "-")
        table.add_row("draft version", f"v{r.draft_version}" if r and r.draft_version else "none (cold start)")
        table.add_row("speculation", f"on, {r.draft_steps} steps" if r and r.draft_steps else "off")
        table.add_row("stream", f"{s.sent_entries} entries, {s.sent_bytes / 2**20:.0f} MiB sent, {s.dropped} dropped, "
                      f"trainer lag {self.lag if self.lag is not None else '-'} entries")
        table.add_row("trainer", ("running" if alive else f"[red]exited ({self.trainer.returncode})[/]")
                      + f", published {self.promoter.published or 'nothing yet'}")
        return table
