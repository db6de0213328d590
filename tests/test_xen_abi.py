"""The real backend's ABI numbers against Xen's and Linux's headers (no /dev/xen needed).

Expected values are written out from the header definitions (tools/include/xen-sys/Linux/evtchn.h,
gntdev.h, xen/include/public/io/xs_wire.h, xen.h, grant_table.h, domctl.h).  Where the system has
Linux's copies of evtchn.h/gntdev.h and a C compiler, the ioctl numbers are also compiled for real.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xenstored import ring
from xenstored.hypervisor import choose, xen_abi
from xenstored.hypervisor.base import SHUTDOWN_CRASH, VIRQ_DOM_EXC
from xenstored.hypervisor.xen import _xs_error, domain_info_from_flags

EXPECTED_IOCTLS = {
    # _IOC(_IOC_NONE, 'E', nr, size) = size << 16 | 'E' << 8 | nr
    "IOCTL_EVTCHN_BIND_VIRQ": 0x00044500,
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": 0x00084501,
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": 0x00044502,
    "IOCTL_EVTCHN_UNBIND": 0x00044503,
    "IOCTL_EVTCHN_NOTIFY": 0x00044504,
    "IOCTL_EVTCHN_RESET": 0x00004505,
    "IOCTL_EVTCHN_RESTRICT_DOMID": 0x00024506,
    # _IOC(_IOC_NONE, 'G', nr, size)
    "IOCTL_GNTDEV_MAP_GRANT_REF": 0x00184700,  # sizeof = 4 + 4 + 8 + 1 * (4 + 4) = 24
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": 0x00104701,  # 8 + 4 + 4 = 16
    "IOCTL_GNTDEV_SET_MAX_GRANTS": 0x00044703,
    # _IOC(_IOC_NONE, 'P', 4, sizeof(struct privcmd_mmapbatch_v2) = 4 + 2 + 2 pad + 8 + 8 + 8 = 32)
    "IOCTL_PRIVCMD_MMAPBATCH_V2": 0x00205004,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_IOCTLS))
def test_ioctl_numbers(name: str) -> None:
    assert getattr(xen_abi, name) == EXPECTED_IOCTLS[name]


def test_struct_sizes() -> None:
    assert xen_abi.EVTCHN_BIND_INTERDOMAIN.size == 8
    assert xen_abi.GNTDEV_MAP_GRANT_REF.size == 24
    assert xen_abi.GNTDEV_UNMAP_GRANT_REF.size == 16
    assert xen_abi.GNTDEV_MAP_INDEX_OFFSET == 8
    assert xen_abi.EVTCHN_PORT.size == 4
    assert xen_abi.DOMAININFO_HEAD.size == 8
    assert xen_abi.PRIVCMD_MMAPBATCH_V2.size == 32


def test_xen_constants() -> None:
    assert xen_abi.GNTTAB_RESERVED_XENSTORE == 1
    assert xen_abi.VIRQ_DOM_EXC == VIRQ_DOM_EXC == 3
    assert xen_abi.DOMID_FIRST_RESERVED == 0x7FF0
    assert (xen_abi.XEN_DOMINF_dying, xen_abi.XEN_DOMINF_shutdown, xen_abi.XEN_DOMINF_running) == (1, 4, 32)
    assert (xen_abi.XEN_DOMINF_shutdownmask, xen_abi.XEN_DOMINF_shutdownshift) == (255, 16)
    assert SHUTDOWN_CRASH == 3


def test_xs_wire_ring_layout() -> None:
    """struct xenstore_domain_interface and its constants (xs_wire.h, docs/misc/xenstore-ring.txt)."""
    assert ring.RING_SIZE == xen_abi.XENSTORE_RING_SIZE == 1024
    assert ring.OFFSETS == {
        "req": 0,
        "rsp": 1024,
        "req_cons": 2048,
        "req_prod": 2052,
        "rsp_cons": 2056,
        "rsp_prod": 2060,
        "server_features": 2064,
        "connection": 2068,
        "error": 2072,
        "evtchn_port": 2076,
    }
    assert (ring.CONNECTED, ring.RECONNECT) == (0, 1)
    assert (ring.ERROR_NONE, ring.ERROR_COMM, ring.ERROR_RINGIDX, ring.ERROR_PROTO) == (0, 1, 2, 3)
    assert xen_abi.XENSTORE_PAYLOAD_MAX == 4096


def test_domain_flags_decode() -> None:
    running = domain_info_from_flags(3, xen_abi.XEN_DOMINF_running)
    assert running.running and not running.shutdown and running.domid == 3
    poweroff = domain_info_from_flags(3, xen_abi.XEN_DOMINF_shutdown | (0 << 16))
    assert poweroff.shutdown and not poweroff.crashed and poweroff.shutdown_reason == 0
    crashed = domain_info_from_flags(3, xen_abi.XEN_DOMINF_shutdown | (3 << 16))
    assert crashed.shutdown and crashed.crashed and crashed.shutdown_reason == 3
    dying = domain_info_from_flags(3, xen_abi.XEN_DOMINF_dying | xen_abi.XEN_DOMINF_shutdown | (1 << 16))
    assert dying.dying and dying.shutdown_reason == 1 and not dying.running
    # a reason without the shutdown flag is stale and ignored
    assert domain_info_from_flags(3, 5 << 16).shutdown_reason == 0


def test_errno_mapping() -> None:
    assert _xs_error(OSError(errno.ENOSPC, "x"), "bind").name == "ENOSPC"
    assert _xs_error(OSError(errno.ESRCH, "x"), "bind").name == "EINVAL"


def test_choose_auto_is_emulated_without_xen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.path.exists("/dev/xen/evtchn"):
        pytest.skip("running on a Xen host")
    monkeypatch.delenv("FAKEXEN_DIR", raising=False)
    hv = choose(None, tmp_path)
    try:
        assert hv.emulated
    finally:
        hv.close()


C_PROGRAM = r"""
#include <stdio.h>
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint16_t domid_t;      /* Linux's uapi copies expect the includer to define these */
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntdev.h>
#include <xen/privcmd.h>      /* needs xen/interface/xen.h: a stub giving xen_pfn_t is provided */
#define P(x) printf(#x " %lu\n", (unsigned long)(x))
int main(void) {
    P(IOCTL_EVTCHN_BIND_VIRQ); P(IOCTL_EVTCHN_BIND_INTERDOMAIN); P(IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    P(IOCTL_EVTCHN_UNBIND); P(IOCTL_EVTCHN_NOTIFY); P(IOCTL_EVTCHN_RESET);
    P(IOCTL_GNTDEV_MAP_GRANT_REF); P(IOCTL_GNTDEV_UNMAP_GRANT_REF); P(IOCTL_GNTDEV_SET_MAX_GRANTS);
    P(IOCTL_PRIVCMD_MMAPBATCH_V2);
    return 0;
}
"""


def test_ioctls_match_system_headers(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if (
        not cc
        or not os.path.exists("/usr/include/xen/evtchn.h")
        or not os.path.exists("/usr/include/xen/gntdev.h")
    ):
        pytest.skip("needs a C compiler and Linux's xen/evtchn.h, xen/gntdev.h")
    src = tmp_path / "abi.c"
    src.write_text(C_PROGRAM)
    stub = tmp_path / "inc" / "xen" / "interface"
    stub.mkdir(parents=True)
    (stub / "xen.h").write_text("typedef unsigned long xen_pfn_t;\n")
    exe = tmp_path / "abi"
    subprocess.run([cc, "-I", str(tmp_path / "inc"), "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert len(got) == 10
    for name, value in got.items():
        assert getattr(xen_abi, name) == value, name
