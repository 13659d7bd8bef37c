"""The subset of SGLang's native HTTP API that load generators use, for `tide engine --http-port`.

    POST /generate  {"text": str, "sampling_params": {"max_new_tokens": int, ...}}
                 -> {"text": str, "meta_info": {"completion_tokens": int}}

Requests queue up; the pod's loop takes a wave of up to its batch size at a time (static batching: a request that
arrives during a wave waits for the next). Other sampling parameters are accepted and ignored (greedy decoding).
"""

import json
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(128, ge=1, le=4096)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)


@dataclass
class Pending:
    text: str
    max_new_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    completion: list[int] = field(default_factory=list)
    output: str = ""


class GenerateServer:
    def __init__(self, port: int, host: str = "127.0.0.1", gather_s: float = 0.05) -> None:
        """`gather_s`: how long a wave waits for more requests after its first one (concurrent clients send within
        a few milliseconds of each other)."""
        self.requests: queue.Queue[Pending] = queue.Queue()
        self.gather_s = gather_s
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="tide-engine-http")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/generate":
                    self.send_error(404)
                    return
                try:
                    body = GenerateRequest.model_validate_json(self.rfile.read(int(self.headers["Content-Length"])))
                except (ValidationError, TypeError, ValueError) as e:
                    self.send_error(400, str(e)[:200])
                    return
                pending = Pending(body.text, body.sampling_params.max_new_tokens)
                requests.put(pending)
                pending.done.wait()
                out = json.dumps({"text": pending.output,
                                  "meta_info": {"completion_tokens": len(pending.completion)}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass  # one line per request would drown the pod's log

        return Handler

    def next_wave(self, max_batch: int, timeout_s: float) -> list[Pending]:
        """Up to `max_batch` requests: the first within `timeout_s` (none: []), the rest within `gather_s`."""
        try:
            wave = [self.requests.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while len(wave) < max_batch:
            try:
                wave.append(self.requests.get(timeout=self.gather_s))
            except queue.Empty:
                break
        return wave

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        while not self.requests.empty():  # nobody will serve these: answer them empty rather than hang
            self.requests.get_nowait().done.set()
