"""Numbers and struct layouts of the Xen and Linux interfaces the real backend uses, in one place.

They are part of stable ABIs (Linux's xen/evtchn.h and xen/gntdev.h ioctls, Xen's public headers),
so hard-coding them avoids a compiled extension.  tests/test_xen_abi.py checks each value against
the headers' definitions, so a typo here cannot reach a real host unnoticed.
"""

from __future__ import annotations

import struct

# -- <asm-generic/ioctl.h> -----------------------------------------------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0


def _IOC(direction: int, type_: str, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# -- /dev/xen/evtchn (tools/include/xen-sys/Linux/evtchn.h) ------------------------------------------
EVTCHN_BIND_VIRQ = struct.Struct("=I")  # virq
EVTCHN_BIND_INTERDOMAIN = struct.Struct("=II")  # remote_domain, remote_port
EVTCHN_BIND_UNBOUND_PORT = struct.Struct("=I")  # remote_domain
EVTCHN_UNBIND = struct.Struct("=I")  # port
EVTCHN_NOTIFY = struct.Struct("=I")  # port
EVTCHN_RESTRICT_DOMID = struct.Struct("=H")  # domid_t

IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, "E", 0, EVTCHN_BIND_VIRQ.size)
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, "E", 1, EVTCHN_BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, "E", 2, EVTCHN_BIND_UNBOUND_PORT.size)
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, "E", 3, EVTCHN_UNBIND.size)
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, EVTCHN_NOTIFY.size)
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, "E", 6, EVTCHN_RESTRICT_DOMID.size)

# read() on the device yields pending ports as native u32s; write() of the same u32s unmasks them.
EVTCHN_PORT = struct.Struct("=I")

# -- /dev/xen/gntdev (tools/include/xen-sys/Linux/gntdev.h) ------------------------------------------
# struct ioctl_gntdev_map_grant_ref { u32 count; u32 pad; u64 index; struct { u32 domid; u32 ref; } refs[1]; }
GNTDEV_MAP_GRANT_REF = struct.Struct("=IIQII")
# struct ioctl_gntdev_unmap_grant_ref { u64 index; u32 count; u32 pad; }
GNTDEV_UNMAP_GRANT_REF = struct.Struct("=QII")
GNTDEV_SET_MAX_GRANTS = struct.Struct("=I")
GNTDEV_MAP_INDEX_OFFSET = 8  # where the driver writes the mmap offset

IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, "G", 0, GNTDEV_MAP_GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, "G", 1, GNTDEV_UNMAP_GRANT_REF.size)
IOCTL_GNTDEV_SET_MAX_GRANTS = _IOC(_IOC_NONE, "G", 3, GNTDEV_SET_MAX_GRANTS.size)

# -- Xen public headers ---------------------------------------------------------------------------
GNTTAB_RESERVED_XENSTORE = 1  # grant_table.h: the guest grants its xenstore page as ref 1
VIRQ_DOM_EXC = 3  # xen.h
DOMID_FIRST_RESERVED = 0x7FF0  # xen.h

# domctl.h struct xen_domctl_getdomaininfo: domid_t domain @0, u16 pad, u32 flags @4, ...
DOMAININFO_HEAD = struct.Struct("=HHI")
XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_shutdownmask = 255
XEN_DOMINF_shutdownshift = 16

# io/xs_wire.h struct xenstore_domain_interface: see xenstored.ring for the layout it implements.
XENSTORE_RING_SIZE = 1024
XENSTORE_PAYLOAD_MAX = 4096

# Where Linux dom0 exposes the store domain's own page and event channel.
XSD_KVA = "/proc/xen/xsd_kva"
XSD_PORT = "/proc/xen/xsd_port"
EVTCHN_DEVICE = "/dev/xen/evtchn"
GNTDEV_DEVICE = "/dev/xen/gntdev"
PRIVCMD_DEVICE = "/dev/xen/privcmd"

# struct privcmd_mmapbatch_v2 (linux/include/uapi/xen/privcmd.h): num u32, dom u16, (pad),
# addr u64, arr xen_pfn_t*, err int*.  The foreign-mapping fallback for guest rings.
PRIVCMD_MMAPBATCH_V2 = struct.Struct("=IHxxQQQ")
IOCTL_PRIVCMD_MMAPBATCH_V2 = _IOC(_IOC_NONE, "P", 4, PRIVCMD_MMAPBATCH_V2.size)
