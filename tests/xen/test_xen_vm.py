"""Real Xen 4.17 under QEMU TCG: our daemon as dom0's system XenStore, PV and PVH guests, live update,
and a PV guest's devices and lifecycle (disk, vif, hotplug, save/restore).

Opt-in with XS_XENVM=1 (.ci/run sets it).  Everything happens in tests/xen/xenvm.py; each test
runs it as a subprocess and shows its per-stage timings and verdict in the pytest output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from xenvm import DEVICE_CI  # tests/xen is not a package: import it by path

pytestmark = [
    pytest.mark.xenvm,
    pytest.mark.skipif(
        os.environ.get("XS_XENVM") != "1",
        reason="boots real Xen under QEMU: set XS_XENVM=1 (see tests/xen/README.md)",
    ),
]


def _xenvm(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    """Run xenvm.py with these arguments; pass on exit 0, skip on 3 (inconclusive), else fail.

    No rerun of a failed boot here: xenvm.py itself retries a boot only when a process outside
    the daemon crashed (see tests/xen/README.md, Reliability).  The rerun that used to be here
    covered an intermittent xen-init-dom0 hang, which was the daemon's own bug (it wiped dom0's
    ring at start-up) and is fixed."""
    cmd = [sys.executable, str(HERE / "xenvm.py"), *args]
    r = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith(("xenvm: stage", "xenvm: attempt", "xenvm: guest lost", "xenvm: daemon died", "xenvm: note", "XENVM"))]
    with capsys.disabled():
        print("\n" + "\n".join(summary), flush=True)
    # 3: every boot was spoilt by a process crashing outside the daemon (QEMU TCG, see README):
    # nothing was learnt about the daemon, so it is reported as skipped, loudly, not as a pass.
    if r.returncode == 3:
        pytest.skip(summary[-1] if summary else "inconclusive: platform crashes")
    # Exit 2 means the machine cannot run it (no apt, not root...): with XS_XENVM=1 that is a
    # failure too, so that a CI machine losing the ability to run it does not go unnoticed.
    assert r.returncode == 0, r.stdout[-60000:]


def test_real_xen_pv_pvh_guests_and_live_update(capsys: pytest.CaptureFixture[str]) -> None:
    # The daemon as a Debian host installs it: the built package on Debian's python3 and trio.
    _xenvm(capsys, "--guests", "pv,pvh", "--live-update", "--from-deb")


def test_real_xen_pv_guest_devices(capsys: pytest.CaptureFixture[str]) -> None:
    """Disk and vif backends with Xen's hotplug scripts, hotplug, save/restore: the stages in
    DEVICE_CI (XS_XENVM_DEVICES=all, or a comma-separated list, picks others; see README)."""
    # One retry only (not 2): a device boot takes 3-4 minutes, CI's whole xenvm step has 6.
    _xenvm(capsys, "--devices", os.environ.get("XS_XENVM_DEVICES") or ",".join(DEVICE_CI), "--retries", "1")
