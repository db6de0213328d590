"""An emulated guest doing a mix of XenStore work on its own home, as a separate process.

Usage: worker.py DOMID OPS.  Prints one JSON line: ops done, errors by name, seconds.
"""

import json
import sys
import time

from xenstored.guest import Guest
from xenstored.wire import XsError


def main() -> int:
    domid, nops = int(sys.argv[1]), int(sys.argv[2])
    errors: dict[str, int] = {}
    done = 0
    with Guest(domid, timeout=30.0) as g:
        start = time.perf_counter()
        for i in range(nops):
            try:
                k = i % 5
                if k == 0:
                    g.write(f"data/k{i % 10}", f"v{i}")
                elif k == 1:
                    assert g.read(f"data/k{(i - 1) % 10}") == f"v{i - 1}".encode()
                elif k == 2:
                    assert f"k{(i - 2) % 10}" in g.ls("data")
                elif k == 3:
                    with g.transaction() as tx:
                        g.write("data/tx", str(i), tx)
                        g.read("data/tx", tx)
                else:
                    assert g.get_domain_path() == f"/local/domain/{domid}"
                done += 1
            except XsError as e:
                errors[e.name] = errors.get(e.name, 0) + 1
        elapsed = time.perf_counter() - start
    print(json.dumps({"domid": domid, "done": done, "errors": errors, "seconds": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
