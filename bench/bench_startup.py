"""Start-up time: from exec to the socket answering, for a fresh start and for a recovery.

    python -m bench.bench_startup [--runs 10] [--cold] [--against-cmd 'CMD {rundir}']

Every Xen host pays the daemon's start on its boot path, and a crash-only daemon pays it again
at every restart.  Reported: the median and the best of ``--runs`` starts of our daemon (fresh:
an empty run directory; recovery: after a kill -9 with a small store), and of the other daemon
if ``--against-cmd`` starts one (``{rundir}`` replaced by a fresh run directory).  For where the
time goes, run ``python -X importtime -m xenstored --version``.

An installed daemon starts from byte code (dh_python3 and pip compile at install), but a source
tree run with ``PYTHONDONTWRITEBYTECODE`` set (as CI and the test machines do) has none, and
compiling our modules then costs more than everything else we import: so the package the daemon
will import is compiled first, unless ``--cold`` asks for the uncompiled figure.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from .proto import Client


def _wait(sock: str, proc: subprocess.Popen[bytes], t0: float) -> float:
    while True:
        try:
            Client(sock).close()
            return time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}") from None
            time.sleep(0.0005)


def _ours(rundir: str) -> list[str]:
    return [sys.executable, "-m", "xenstored", "-N", "--emulate", "--rundir", rundir, "--log-level", "warning"]


def compile_package() -> str:
    """Byte-compile the xenstored the daemon will import (same interpreter, cwd and path)."""
    where = subprocess.run(
        [sys.executable, "-c", "import os, xenstored; print(os.path.dirname(xenstored.__file__))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    compileall.compile_dir(where, quiet=1)
    return where


def measure(cmd_for: callable, runs: int, recover: bool) -> list[float]:  # type: ignore[valid-type]
    times = []
    for _ in range(runs):
        rundir = tempfile.mkdtemp(prefix="xsbs", dir="/tmp")
        sock = os.path.join(rundir, "socket")
        env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "FAKEXEN_DIR")}
        if recover:
            first = subprocess.Popen(cmd_for(rundir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            _wait(sock, first, time.perf_counter())
            with Client(sock) as c:
                for i in range(100):
                    c.write(f"/s/n{i}", "v")
            first.send_signal(signal.SIGKILL)
            first.wait()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd_for(rundir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            times.append(_wait(sock, proc, t0))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            subprocess.run(["rm", "-rf", rundir], check=False)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--against-cmd")
    ap.add_argument("--cold", action="store_true", help="do not byte-compile the package first")
    a = ap.parse_args()
    if not a.cold:
        print(f"byte-compiled {compile_package()}")
    rows = [("ours, fresh", measure(_ours, a.runs, False)), ("ours, recovery after kill -9", measure(_ours, a.runs, True))]
    if a.against_cmd:

        def other(rundir: str) -> list[str]:
            cmd = a.against_cmd.replace("{rundir}", rundir) if "{rundir}" in a.against_cmd else f"{a.against_cmd} {rundir}"
            return shlex.split(cmd)

        rows.append(("other, fresh", measure(other, a.runs, False)))
    print(f"{'exec to socket answering (ms)':<34}{'median':>10}{'best':>10}")
    for label, ts in rows:
        print(f"{label:<34}{statistics.median(ts) * 1e3:>10.1f}{min(ts) * 1e3:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
