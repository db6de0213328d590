"""The real-Xen backend: Linux's /dev/xen devices plus libxenctrl for domain state.

Deliberately thin and dependency-free (ioctl and ctypes, no compiled extension), because all the
logic lives in the core and is exercised by the emulated backend.  Every ABI number comes from
:mod:`.xen_abi`, which is tested against Xen's headers.

* event channels: ``/dev/xen/evtchn`` ioctls; pending ports are read as u32s and unmasked by
  writing them back after the callbacks ran;
* guest pages: grant reference 1 (GNTTAB_RESERVED_XENSTORE) through ``/dev/xen/gntdev``, mmap'ed
  at the offset the MAP_GRANT_REF ioctl returns (the gfn is ignored, as by C xenstored);
* the store domain's own page: ``/proc/xen/xsd_kva`` and ``/proc/xen/xsd_port``;
* domain state: ``xc_domain_getinfolist`` from libxenctrl, looked up once at start (see
  :func:`load_library`); without it the daemon refuses to start and names the package.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import fcntl
import inspect
import mmap
import os
from collections.abc import Callable

import trio

from ..wire import ERRORS, XsError
from . import xen_abi as abi
from .base import SHUTDOWN_CRASH, DomainInfo, DomExcCallback, Hypervisor, HypervisorError, PortCallback

PAGE_SIZE = 4096
STORE_DOMID = 0  # the domain whose page is /proc/xen/xsd_kva (C: xenbus_master_domid(), default 0)


# Xen's tool libraries carry the Xen version in their soname (libxenctrl.so.4.17 on Debian 12);
# the unversioned libxenctrl.so exists only with the -dev package, and find_library needs
# ldconfig or gcc to find the rest.  So after find_library, try the names the 4.x releases that
# Debian and upstream ship use, newest first.
XEN_VERSIONS = tuple(f"4.{minor}" for minor in range(21, 10, -1))
# Where each library comes from, for the refusal message.
PACKAGES = {
    "xenctrl": "the libxenmisc package of your Xen version (Debian 12: libxenmisc4.17)",
}

Loader = Callable[[str], ctypes.CDLL]
_loaded: dict[str, ctypes.CDLL] = {}


def _cdll(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(name, use_errno=True)


def _find_library(name: str, find: Callable[[str], str | None]) -> str | None:
    """ctypes.util.find_library, which must never stop the start: it runs ldconfig and gcc,
    and raises without a writable temporary directory (FileNotFoundError) among others."""
    try:
        return find(name)
    except Exception:  # noqa: BLE001 - whatever it raises, fall back to the known sonames
        return None


def library_candidates(name: str, found: str | None = None) -> list[str]:
    """The names to try for ``lib<name>``, in order: find_library's answer, the unversioned
    name, then ``lib<name>.so.4.21`` down to ``.so.4.11``."""
    names = [found] if found else []
    names += [f"lib{name}.so", *(f"lib{name}.so.{v}" for v in XEN_VERSIONS)]
    return list(dict.fromkeys(names))


def load_library(
    name: str,
    *,
    loader: Loader = _cdll,
    find: Callable[[str], str | None] = ctypes.util.find_library,
) -> ctypes.CDLL:
    """``lib<name>`` loaded with ctypes, once per process; HypervisorError naming the library
    and the package to install when no candidate loads."""
    lib = _loaded.get(name)
    if lib is not None:
        return lib
    names = library_candidates(name, _find_library(name, find))
    failures: list[str] = []
    for candidate in names:
        try:
            lib = loader(candidate)
        except OSError as e:
            text = str(e)
            if not text.startswith(f"{candidate}:"):
                failures.append(text)  # found, but it does not load (a missing dependency, say)
            continue
        _loaded[name] = lib
        return lib
    package = PACKAGES.get(name, f"the package that provides lib{name}")
    why = f" ({'; '.join(failures)})" if failures else ""
    raise HypervisorError(
        f"cannot load Xen's library lib{name}: tried {', '.join(names)}{why}; install {package}"
    )


def _xs_error(e: OSError, what: str) -> XsError:
    """An errno as the XenStore error a client can understand (C replies with the errno name)."""
    name = errno.errorcode.get(e.errno or 0, "EINVAL")
    return XsError(name if name in ERRORS else "EINVAL", f"{what}: {e.strerror}")


def domain_info_from_flags(domid: int, flags: int) -> DomainInfo:
    """Decode xen_domctl_getdomaininfo.flags the way xc_domain_getinfo does."""
    shutdown = bool(flags & abi.XEN_DOMINF_shutdown)
    reason = (flags >> abi.XEN_DOMINF_shutdownshift) & abi.XEN_DOMINF_shutdownmask if shutdown else 0
    return DomainInfo(
        domid=domid,
        shutdown=shutdown,
        crashed=shutdown and reason == SHUTDOWN_CRASH,
        dying=bool(flags & abi.XEN_DOMINF_dying),
        shutdown_reason=reason,
    )


def _mmap_page(fd: int) -> memoryview:
    """mmap one shared page of ``fd`` with libc's mmap.

    Python's mmap.mmap refuses /proc/xen/xsd_kva ("mmap length is greater than file size"): the
    file is regular and reports size 0, yet the kernel maps the store page from it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return memoryview((ctypes.c_char * PAGE_SIZE).from_address(addr)).cast("B")


class _XenCtrl:
    """ctypes binding of the libxenctrl calls we need (the handle is opened on first use)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.xc_interface_open.restype = ctypes.c_void_p
        lib.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.xc_interface_close.argtypes = [ctypes.c_void_p]
        lib.xc_domain_getinfolist.restype = ctypes.c_int
        lib.xc_domain_getinfolist.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_uint,
            ctypes.c_void_p,
        ]
        handle = lib.xc_interface_open(None, None, 0)
        if not handle:
            raise OSError(ctypes.get_errno(), "xc_interface_open failed")
        self._lib = lib
        self._xch = handle
        # One record at a time into a generous buffer: the record size differs between Xen
        # versions, but its head (domain, flags) does not.
        self._buf = ctypes.create_string_buffer(4096)

    def next_domain(self, first: int) -> tuple[int, int] | None:
        """(domid, flags) of the first existing domain >= first, or None."""
        n = self._lib.xc_domain_getinfolist(self._xch, first, 1, self._buf)
        if n < 0:
            raise OSError(ctypes.get_errno(), "xc_domain_getinfolist failed")
        if n == 0:
            return None
        domid, _pad, flags = abi.DOMAININFO_HEAD.unpack_from(self._buf.raw)
        return domid, flags

    def close(self) -> None:
        if self._xch:
            self._lib.xc_interface_close(self._xch)
            self._xch = None


class XenHypervisor(Hypervisor):
    emulated = False

    def __init__(
        self,
        evtchn_device: str = abi.EVTCHN_DEVICE,
        gntdev_device: str = abi.GNTDEV_DEVICE,
        *,
        loader: Loader = _cdll,
    ) -> None:
        # The library first: a missing package is the likelier and the more fixable problem,
        # and it must stop the start rather than the first domain event.
        self._libxenctrl = load_library("xenctrl", loader=loader)
        try:
            self._fd = os.open(evtchn_device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HypervisorError(
                f"cannot open {evtchn_device}: {e.strerror or e} (run as root in the Xen dom0, "
                "or use --emulate to serve emulated domains)"
            ) from None
        os.set_blocking(self._fd, False)
        self._gntdev_path = gntdev_device
        self._gntdev: int | None = None
        self._xc: _XenCtrl | None = None
        self._maps: dict[int, tuple[mmap.mmap, memoryview, int | None]] = {}
        self._store_page: memoryview | None = None  # /proc/xen/xsd_kva, mapped once
        self.virq_port = self._ioctl(abi.IOCTL_EVTCHN_BIND_VIRQ, abi.EVTCHN_BIND_VIRQ.pack(abi.VIRQ_DOM_EXC))

    def _ioctl(self, request: int, arg: bytes) -> int:
        buf = bytearray(arg)
        return fcntl.ioctl(self._fd, request, buf, True)

    # -- domains -------------------------------------------------------------------------------

    @property
    def xc(self) -> _XenCtrl:
        if self._xc is None:
            self._xc = _XenCtrl(self._libxenctrl)
        return self._xc

    def domain_info(self, domid: int) -> DomainInfo | None:
        found = self.xc.next_domain(domid)
        if found is None or found[0] != domid:
            return None
        return domain_info_from_flags(*found)

    def domains(self) -> list[DomainInfo]:
        out: list[DomainInfo] = []
        first = 0
        while first < abi.DOMID_FIRST_RESERVED:
            found = self.xc.next_domain(first)
            if found is None:
                break
            out.append(domain_info_from_flags(*found))
            first = found[0] + 1
        return out

    # -- rings ---------------------------------------------------------------------------------

    def _gntdev_fd(self) -> int:
        if self._gntdev is None:
            self._gntdev = os.open(self._gntdev_path, os.O_RDWR | os.O_CLOEXEC)
        return self._gntdev

    def map_ring(self, domid: int, gfn: int) -> memoryview:
        if domid == STORE_DOMID:
            # The store domain has no grant for its own page (C's map_interface() uses
            # xenbus_map() for the master domain): a restore after live update comes here.
            found = self.dom0_ring()
            if found is None:
                raise XsError("EINVAL", f"no {abi.XSD_KVA} for dom{domid}")
            return found[0]
        self.unmap_ring(domid)
        index: int | None
        try:
            fd = self._gntdev_fd()
            req = bytearray(abi.GNTDEV_MAP_GRANT_REF.pack(1, 0, 0, domid, abi.GNTTAB_RESERVED_XENSTORE))
            fcntl.ioctl(fd, abi.IOCTL_GNTDEV_MAP_GRANT_REF, req, True)
            _count, _pad, index, _d, _r = abi.GNTDEV_MAP_GRANT_REF.unpack(req)
            try:
                m = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=index)
            except OSError:
                self._unmap_grant(index)
                raise
        except OSError as grant_error:
            # No grant 1 (an older toolstack, or no gntdev): map the frame INTRODUCE named.
            try:
                m, index = self._map_foreign(domid, gfn), None
            except OSError as e:
                raise XsError("EINVAL", f"map xenstore page of dom{domid}: {grant_error}; {e}") from e
        view = memoryview(m)
        self._maps[domid] = (m, view, index)
        return view

    @staticmethod
    def _map_foreign(domid: int, gfn: int) -> mmap.mmap:
        """The privcmd route (xc_map_foreign_range): one page of ``domid`` at frame ``gfn``."""
        fd = os.open(abi.PRIVCMD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            m = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                window = (ctypes.c_char * PAGE_SIZE).from_buffer(m)
                addr = ctypes.addressof(window)
                del window  # release the export, or the mmap could never be closed
                frames = (ctypes.c_uint64 * 1)(gfn)
                errors = (ctypes.c_int * 1)(0)
                req = bytearray(
                    abi.PRIVCMD_MMAPBATCH_V2.pack(1, domid, addr, ctypes.addressof(frames), ctypes.addressof(errors))
                )
                fcntl.ioctl(fd, abi.IOCTL_PRIVCMD_MMAPBATCH_V2, req, True)
                if errors[0]:
                    raise OSError(-errors[0], os.strerror(-errors[0]))
            except BaseException:
                m.close()
                raise
        finally:
            os.close(fd)  # the mapping keeps the device open
        return m

    def _unmap_grant(self, index: int) -> None:
        if self._gntdev is None:
            return
        req = bytearray(abi.GNTDEV_UNMAP_GRANT_REF.pack(index, 1, 0))
        try:
            fcntl.ioctl(self._gntdev, abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, req, True)
        except OSError:
            pass  # still mmap'ed by a lingering view; the driver frees it on munmap/close

    def unmap_ring(self, domid: int) -> None:
        entry = self._maps.pop(domid, None)
        if entry is None:
            return
        m, view, index = entry
        view.release()
        try:
            m.close()
        except BufferError:
            return  # a Ring still holds the page; it is unmapped when that view goes away
        if index is not None:
            self._unmap_grant(index)

    def dom0_ring(self) -> tuple[memoryview, int] | None:
        try:
            with open(abi.XSD_PORT) as f:
                port = int(f.read().strip(), 0)
            fd = os.open(abi.XSD_KVA, os.O_RDWR | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            if self._store_page is None:
                # Never unmapped: the page lives as long as the daemon (as in C xenstored), and
                # munmap under a live Ring view would be a use-after-free.
                self._store_page = _mmap_page(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        return self._store_page, port

    # -- event channels ------------------------------------------------------------------------

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        try:
            return self._ioctl(
                abi.IOCTL_EVTCHN_BIND_INTERDOMAIN, abi.EVTCHN_BIND_INTERDOMAIN.pack(domid, remote_port)
            )
        except OSError as e:
            raise _xs_error(e, f"bind event channel dom{domid}:{remote_port}") from e

    def unbind(self, local_port: int) -> None:
        try:
            self._ioctl(abi.IOCTL_EVTCHN_UNBIND, abi.EVTCHN_UNBIND.pack(local_port))
        except OSError:
            pass  # already gone; cleanup must not fail

    def notify(self, local_port: int) -> None:
        try:
            self._ioctl(abi.IOCTL_EVTCHN_NOTIFY, abi.EVTCHN_NOTIFY.pack(local_port))
        except OSError:
            pass  # the peer is gone; its cleanup arrives through VIRQ_DOM_EXC

    def event_fd(self) -> int | None:
        return self._fd

    def handle_events(self, on_port_kicked: PortCallback, on_dom_exc: Callable[[], None]) -> None:
        ports = self._pending()
        try:
            if self._kick(ports, on_port_kicked):
                on_dom_exc()
        finally:
            self._unmask(ports)

    def _pending(self) -> array.array[int]:
        """The ports pending now (/dev/xen/evtchn is readable while there are some)."""
        ports = array.array("I")
        try:
            data = os.read(self._fd, 4 * 256)
        except (BlockingIOError, InterruptedError):
            return ports
        ports.frombytes(data[: len(data) - len(data) % 4])
        return ports

    def _kick(self, ports: array.array[int], on_port_kicked: PortCallback) -> bool:
        """Call back once per kicked port; True if VIRQ_DOM_EXC is among them."""
        virq = False
        for port in dict.fromkeys(ports):
            if port == self.virq_port:
                virq = True
            else:
                on_port_kicked(port)
        return virq

    def _unmask(self, ports: array.array[int]) -> None:
        if ports:
            try:
                os.write(self._fd, ports.tobytes())  # unmask what we handled
            except OSError:
                pass

    async def run(
        self,
        on_port_kicked: PortCallback,
        on_dom_exc: DomExcCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            ports = self._pending()
            try:
                if self._kick(ports, on_port_kicked):
                    res = on_dom_exc()
                    if inspect.isawaitable(res):
                        await res
            finally:
                self._unmask(ports)
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        for domid in list(self._maps):
            self.unmap_ring(domid)
        if self._gntdev is not None:
            os.close(self._gntdev)
            self._gntdev = None
        if self._xc is not None:
            self._xc.close()
            self._xc = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
