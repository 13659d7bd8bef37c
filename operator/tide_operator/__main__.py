"""`python -m tide_operator [kopf run options]`: the operator, all namespaces unless `-n` is given."""

import sys

from kopf.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    scope = [] if any(a in ("-n", "--namespace", "-A", "--all-namespaces") for a in args) else ["-A"]
    sys.exit(main(["run", "--standalone", "-m", "tide_operator.handlers", *scope, *args]))
