"""Where the scheduler thread's time goes in the capture entry points on the GPU: `tide bench capture --device
cuda` under cProfile (the scheduler loop runs on the main thread, the only one cProfile sees).

    python3 scripts/gpu/profile_capture.py OUT.txt [batch size]
"""

import cProfile
import io
import pstats
import sys

from rich.console import Console

from tide_sglang.bench import capture


def main() -> None:
    out, bs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
    capture.GPU_BATCH_SIZES = (bs,)
    prof = cProfile.Profile()
    prof.enable()
    capture.run(True, Console(stderr=True), device="cuda", seconds=3.0)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
    stats.print_stats(45)
    stats.sort_stats("cumulative").print_stats("capture.py|link.py|slab.py|wire.py", 30)
    with open(out, "w") as f:
        f.write(text.getvalue())


if __name__ == "__main__":
    main()
