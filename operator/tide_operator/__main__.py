"""`python -m tide_operator [kopf run options]`: the operator, all namespaces unless `-n` is given.

With `--peering NAME` (the chart passes it) several replicas share the work through kopf's peering object
(ClusterKopfPeering NAME with all namespaces, KopfPeering NAME in each namespace with `-n`): kopf pauses every
operator but the one of the highest priority, and one of equal priority pauses them all, so each replica draws its
own random priority unless `--priority` is given. The standby resumes once the active one's peering record expires
(kopf's lifetime, 60 s). Without `--peering` it runs standalone: run one replica then.
"""

import random
import sys

from kopf.cli import main


def _given(args: list[str], *flags: str) -> bool:
    return any(a in flags or a.startswith(tuple(f"{f}=" for f in flags)) for a in args)


def kopf_argv(args: list[str]) -> list[str]:
    """`kopf run` arguments for `python -m tide_operator ARGS`."""
    scope = [] if _given(args, "-n", "--namespace", "-A", "--all-namespaces") else ["-A"]
    if not _given(args, "-P", "--peering"):
        return ["run", "--standalone", "-m", "tide_operator.handlers", *scope, *args]
    priority = [] if _given(args, "-p", "--priority") else [f"--priority={random.SystemRandom().randint(1, 2**30)}"]
    return ["run", "-m", "tide_operator.handlers", *scope, *priority, *args]


if __name__ == "__main__":
    sys.exit(main(kopf_argv(sys.argv[1:])))
