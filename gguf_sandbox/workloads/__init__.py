"""Named workloads the matrix runs in every cell; each prints exactly one JSON report line on stdout.

Exit codes: 0 success; 3 refused by the memory budget (a JSON error is printed instead of a report);
4 bad input (missing model, malformed file); anything else, including 137 (SIGKILL by the OOM killer),
is a crash. Everything here runs inside a memory limit: it never imports yaml, docker or the harness.
"""
