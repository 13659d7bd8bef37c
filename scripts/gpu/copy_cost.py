"""Scheduler-thread CPU cost of the ways to queue capture's device-to-host copy (docs/sglang.md, "Capture cost").

    python3 scripts/gpu/copy_cost.py OUT.json

Each variant queues the copy of `rows` bf16 rows of the verify's hidden width into the real slab (shared memory,
`cudaHostRegister`ed by `Slab.pin`), on the current stream, `CALLS` times; the figure is the CPU microseconds per
call (wall and thread time, the GPU synchronized only at the end). Needs only torch and the plugin's slab.
"""

import ctypes
import json
import sys
import time
from collections.abc import Callable

import torch

from tide_sglang.plugin.slab import Slab

CALLS = 2000
WIDTH = 3 * 576  # SmolLM2-135M's hidden size times the three fused layers
D2H = 2  # cudaMemcpyDeviceToHost


def cudart() -> ctypes.CDLL:
    """The CUDA runtime torch itself loaded (read from the process's mappings, so the same library)."""
    torch.cuda.init()
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcudart" in line}
    lib = ctypes.CDLL(sorted(paths)[0])
    lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.cudaMemcpyAsync.restype = ctypes.c_int
    return lib


def timed(fn: Callable[[], object]) -> dict[str, float]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    w0, t0 = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(CALLS):
        fn()
    w1, t1 = time.perf_counter_ns(), time.thread_time_ns()
    torch.cuda.synchronize()
    return {"wall_us": round((w1 - w0) / CALLS / 1e3, 2), "thread_us": round((t1 - t0) / CALLS / 1e3, 2)}


def variants(rows: int, slab: Slab, lib: ctypes.CDLL) -> dict[str, Callable[[], object]]:
    src = torch.randn(rows + 7, WIDTH, device="cuda", dtype=torch.bfloat16)
    dst = torch.frombuffer(slab.data(0), dtype=torch.bfloat16, count=512 * WIDTH).view(512, WIDTH)
    pinned = torch.empty(512, WIDTH, dtype=torch.bfloat16).pin_memory()
    view = dst[:rows]
    nbytes = rows * WIDTH * 2
    dev = torch.cuda.current_device()
    stream = torch._C._cuda_getCurrentRawStream
    return {
        "slice_and_copy_registered": lambda: dst[:rows].copy_(src[:rows], non_blocking=True),
        "slice_and_copy_torch_pinned": lambda: pinned[:rows].copy_(src[:rows], non_blocking=True),
        "copy_prebuilt_views": lambda: view.copy_(src[:rows], non_blocking=True),
        "slice_only": lambda: (dst[:rows], src[:rows]),
        "current_stream": torch.cuda.current_stream,
        "raw_stream": lambda: stream(dev),
        "data_ptr": src.data_ptr,
        "ctypes_memcpy_async": lambda: lib.cudaMemcpyAsync(view.data_ptr(), src.data_ptr(), nbytes, D2H, stream(dev)),
    }


def main() -> None:
    out = sys.argv[1]
    slab = Slab.create(4, 8 << 20)
    slab.pin()
    lib = cudart()
    results: dict[str, object] = {}
    for rows in (4, 32, 256):
        results[str(rows)] = {name: timed(fn) for name, fn in variants(rows, slab, lib).items()}
        print(rows, json.dumps(results[str(rows)]), flush=True)
    src = torch.randn(8, WIDTH, device="cuda", dtype=torch.bfloat16)  # that the ctypes copy really copies
    view = torch.frombuffer(slab.data(1), dtype=torch.bfloat16, count=8 * WIDTH).view(8, WIDTH)
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    assert lib.cudaMemcpyAsync(view.data_ptr(), src.data_ptr(), src.numel() * 2, D2H, stream) == 0
    torch.cuda.synchronize()
    results["ctypes_copy_exact"] = bool(torch.equal(view, src.cpu()))
    results["device"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
