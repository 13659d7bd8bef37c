"""A live server profiled from outside: forcing through the control state, timing from its own /metrics.

No private call into the engine: `write_forced_steps` names the pod and the step count (the engine's control
state poll picks it up: SGLang's plugin through its swapper, `tide engine` through its follower), and the engine's
`tide_decode_step_seconds{batch_size, draft_steps}` histogram (the interval between consecutive decode batches,
by batch-size bucket) gives the times. Load is either the server's own traffic or `GenerateLoad`: b concurrent
clients of SGLang's native /generate, so decode runs at the batch sizes the server will see.
"""

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from prometheus_client.parser import text_string_to_metric_families

from tide_sglang.control.policy import bucket
from tide_sglang.profiler.measure import Samples, enough
from tide_sglang.rollout import write_forced_steps
from tide_sglang.stream.connection import Client

STEP_METRIC = "tide_decode_step_seconds"
Totals = dict[tuple[int, int], tuple[float, int]]  # (bucket, g) -> (seconds summed, steps) since the engine started
Load = Callable[[int], AbstractContextManager[None]]  # b -> while entered, b requests are in flight at all times


def step_totals(text: str, deployment: str) -> Totals:
    """The step-time histogram's sums and counts in a /metrics page, over every draft version."""
    out: dict[tuple[int, int], list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != STEP_METRIC:
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("deployment") != deployment or sample.name not in (f"{STEP_METRIC}_sum",
                                                                               f"{STEP_METRIC}_count"):
                continue
            entry = out.setdefault((int(labels["batch_size"]), int(labels["draft_steps"])), [0.0, 0.0])
            entry[sample.name.endswith("_count")] += sample.value
    return {k: (s, int(n)) for k, (s, n) in out.items()}


def delta(before: Totals, after: Totals, g: int) -> Samples:
    """Per bucket, the steps at g draft steps between two scrapes."""
    out = {}
    for (b, steps), (s, n) in after.items():
        s0, n0 = before.get((b, steps), (0.0, 0))
        if steps == g and n > n0:
            out[b] = (s - s0, n - n0)
    return out


def scrape(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def wait_until_up(url: str, wait_s: float, poll_s: float = 2.0) -> bool:
    """Whether `url` answers within `wait_s` (tried at least once)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            scrape(url)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)


class Server:
    """`force` and `run` (measure.py) for one pod of a deployment."""

    def __init__(self, client: Client, namespace: str, deployment: str, pod: str, metrics_url: str, *,
                 min_samples: int, load: Load | None = None, point_timeout_s: float = 120.0,
                 poll_s: float = 0.2) -> None:
        self.client, self.namespace, self.deployment, self.pod = client, namespace, deployment, pod
        self.metrics_url, self.min_samples, self.load = metrics_url, min_samples, load
        self.point_timeout_s, self.poll_s = point_timeout_s, poll_s

    def totals(self) -> Totals:
        return step_totals(scrape(self.metrics_url), self.deployment)

    def force(self, g: int | None) -> None:
        write_forced_steps(self.client, self.namespace, self.deployment, self.pod, g)

    def run(self, b: int | None, g: int) -> Samples:
        """Decode steps at g (and at bucket(b) when b is given), from the first one timed after the switch: until
        the engine has picked the forced steps up (its poll), other counts run; the first interval at g spans the
        switch."""
        buckets = None if b is None else [bucket(b)]
        with self.load(b) if self.load is not None and b is not None else contextlib.nullcontext():
            start = self.totals()
            self._wait(lambda: enough(self._only(delta(start, self.totals(), g), buckets), 1, buckets))
            base = self.totals()
            samples: Samples = {}

            def done() -> bool:
                nonlocal samples
                samples = self._only(delta(base, self.totals(), g), buckets)
                return enough(samples, self.min_samples, buckets)

            self._wait(done)
            return samples

    @staticmethod
    def _only(samples: Samples, buckets: list[int] | None) -> Samples:
        return samples if buckets is None else {b: v for b, v in samples.items() if b in buckets}

    def _wait(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate` or the point's time is up (what was timed by then is kept)."""
        deadline = time.monotonic() + self.point_timeout_s
        while not predicate() and time.monotonic() < deadline:
            time.sleep(self.poll_s)


class GenerateLoad:
    """b clients of SGLang's native /generate, each sending its next request when the last one returns."""

    def __init__(self, base_url: str, prompt: str, max_new_tokens: int, timeout_s: float = 600.0) -> None:
        self.url = base_url.rstrip("/") + "/generate"
        self.body = json.dumps({"text": prompt, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}}).encode()
        self.timeout_s = timeout_s
        self.errors = 0

    def _client(self, stop: threading.Event) -> None:
        while not stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
            except OSError:
                self.errors += 1
                stop.wait(1.0)

    @contextlib.contextmanager
    def __call__(self, b: int) -> Iterator[None]:
        stop = threading.Event()
        threads = [threading.Thread(target=self._client, args=(stop,), daemon=True) for _ in range(b)]
        for t in threads:
            t.start()
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join()
