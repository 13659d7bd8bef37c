"""The demo's live `rich` view: what an operator would watch on a dashboard, in the terminal."""

import subprocess
import time
from typing import Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tide_sglang.demo.report import ARMS, ArmWave
from tide_sglang.engine.serve import StepRecord
from tide_sglang.stream import StreamWriter
from tide_sglang.stream.reader import group_lag
from tide_sglang.workloads import PhasePlan


class LiveView:
    def __init__(self, console: Console, plans: list[PhasePlan], writer: StreamWriter, client: redis.Redis,
                 promoter: Any, trainer: subprocess.Popen[bytes]) -> None:
        self.console, self.writer, self.client = console, writer, client
        self.promoter, self.trainer = promoter, trainer
        self.phases = [p.phase.name for p in plans]
        self.last: StepRecord | None = None  # TIDE's last step
        self.waves: dict[str, ArmWave] = {}  # each arm's last wave
        self.lag: int | None = None
        self._lag_at = 0.0
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> "LiveView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def step(self, record: StepRecord) -> None:
        """A TIDE verify step."""
        self.last = record
        if time.monotonic() - self._lag_at > 1.0:
            self._lag_at = time.monotonic()
            self.lag = self._stream_lag()
        self.live.update(self._render())

    def wave(self, result: ArmWave) -> None:
        self.waves[result.arm] = result
        self.live.update(self._render())

    def _stream_lag(self) -> int | None:
        try:
            return group_lag(self.client, self.writer.stream)
        except redis.RedisError:
            return None

    def _render(self) -> Table:
        table = Table(title="TIDE demo — three arms on the same waves", show_header=False, min_width=60)
        table.add_column(style="bold")
        table.add_column()
        r = self.last
        s = self.writer.stats
        alive = self.trainer.poll() is None
        table.add_row("phase", f"{r.phase} ({r.domain})  [{self.phases.index(r.phase) + 1}/{len(self.phases)}]"
                      if r else "starting")
        for arm in ARMS:
            w = self.waves.get(arm)
            table.add_row(arm, f"{w.tokens_per_s:.1f} tokens/s, acceptance length "
                          f"{w.step_tokens / max(w.request_steps, 1):.2f} (last wave)" if w else "-")
        table.add_row("tide draft", f"v{r.draft_version}" if r and r.draft_version else "none (cold start)")
        table.add_row("speculation", f"on, {r.draft_steps} steps" if r and r.draft_steps else "off")
        table.add_row("stream", f"{s.sent_entries} entries, {s.sent_bytes / 2**20:.0f} MiB sent, {s.dropped} dropped, "
                      f"trainer lag {self.lag if self.lag is not None else '-'} entries")
        table.add_row("trainer", ("running" if alive else f"[red]exited ({self.trainer.returncode})[/]")
                      + f", published {self.promoter.published or 'nothing yet'}")
        return table
