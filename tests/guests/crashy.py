"""An emulated guest that keeps working while its XenStore daemon is killed and restarted.

Usage: crashy.py DOMID OPS.  It watches ``w`` in its home, then does OPS operations: writes
(``data/k<n>``), removals, and a counter incremented in a transaction (retried on EAGAIN, as
Linux's xenbus users do).  Each operation that the daemon acknowledged is reflected in the
model it prints as one JSON line: what ``data/`` must hold and how many commits succeeded.
Then it waits for one event under ``w`` (the watch it placed before any crash) and prints it.
"""

from __future__ import annotations

import json
import sys

from xenstored.guest import Guest
from xenstored.wire import Op, XsError


def main() -> int:
    domid, nops = int(sys.argv[1]), int(sys.argv[2])
    model: dict[str, str] = {}
    commits = retries = 0
    with Guest(domid, timeout=60.0) as g:
        g.watch("w", "w")
        assert g.wait_event() == ("w", "w")
        for i in range(nops):
            kind = i % 3
            if kind == 0:
                key = f"data/k{i % 7}"
                g.write(key, f"v{i}")
                model[key] = f"v{i}"
            elif kind == 1:
                while True:
                    tx = int(g.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
                    try:
                        try:
                            count = int(g.read("data/counter", tx))
                        except XsError as e:
                            if e.name != "ENOENT":
                                raise
                            count = 0
                        g.write("data/counter", str(count + 1), tx)
                        g.request(Op.TRANSACTION_END, b"T\0", tx)
                    except XsError as e:
                        if e.name != "EAGAIN":
                            raise
                        retries += 1
                        continue
                    commits += 1
                    model["data/counter"] = str(count + 1)
                    break
            else:
                key = f"data/k{(i + 3) % 7}"
                g.rm(key)
                model.pop(key, None)
        print(json.dumps({"model": model, "commits": commits, "retries": retries}), flush=True)
        path, token = g.wait_event()
        print(json.dumps({"event": [path, token]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
