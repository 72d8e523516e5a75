"""The one wall-clock limit the suite puts on a child process: a last guard against a hang,
never a bound a slow or heavily loaded machine can reach (a 2-core machine at a 1-minute load
of 10 ran a training child for over 5 minutes). Tests wait for what they need (a file, a port,
an exit), not for a time."""

LAST_GUARD_S = 3600
