"""The scheduler's side of its capture helper: start it, send it frames, restart it when it dies.

The helper is a separate process (`python -m tide_sglang.plugin.helper`), so assembling records, the codec, the
checksum, `XADD` and the stats never take the scheduler process's GIL. It gets no CUDA device
(`CUDA_VISIBLE_DEVICES=""`): a CUDA context would take memory on the serving GPU. Frames go through a
non-blocking pipe; a frame that does not fit is dropped and counted, never waited for.
"""

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys

from tide_sglang.plugin.slab import FREE, POSTED, Slab

log = logging.getLogger("tide.plugin.link")

PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ: room for ~20k frames while the helper catches up
_F_SETPIPE_SZ = 1031


class HelperLink:
    """`config` is the JSON the helper starts from (settings, slab name and shape, aux layers, vocabulary)."""

    def __init__(self, slab: Slab, config: dict, env: dict[str, str] | None = None) -> None:
        self.slab, self.config = slab, config
        self.env = {**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": ""}
        self.restarts = 0
        self.lost = 0  # frames or slots lost to a full pipe or a dead helper, reported in the next tick
        self.proc: subprocess.Popen | None = None
        self._fd = -1
        self.start()

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size: the default 64 KiB works too
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(write_fd, False)
        cmd = [sys.executable, "-m", "tide_sglang.plugin.helper", str(read_fd), json.dumps(self.config)]
        self.proc = subprocess.Popen(cmd, pass_fds=(read_fd,), env=self.env, stdin=subprocess.DEVNULL,
                                     start_new_session=False)
        os.close(read_fd)
        self._fd = write_fd
        log.info("TIDE capture helper started (pid %d)", self.proc.pid)

    def send(self, frame: bytes) -> bool:
        try:
            os.write(self._fd, frame)
            return True
        except BlockingIOError:
            self.lost += 1
            return False
        except (BrokenPipeError, OSError):
            self.restart("its pipe closed")
            self.lost += 1
            return False

    def check(self) -> bool:
        """Restart the helper if it exited; True while it runs."""
        if self.proc is not None and self.proc.poll() is None:
            return True
        self.restart(f"it exited with {self.proc.returncode if self.proc else None}")
        return False

    def restart(self, why: str) -> None:
        """The slots a dead helper held are lost (counted); the scheduler's own FILLING slots stay its own."""
        log.error("TIDE capture helper restarts: %s", why)
        self.close_pipe()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        held = [i for i in range(self.slab.slots) if self.slab.flags[i] == POSTED]
        for i in held:
            self.slab.flags[i] = FREE
        self.lost += len(held)
        self.restarts += 1
        self.start()

    def close_pipe(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self, timeout: float = 10.0) -> None:
        """Closing the pipe tells the helper to finish what it holds, flush and exit."""
        self.close_pipe()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
