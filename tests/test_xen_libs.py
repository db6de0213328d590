"""Finding Xen's libraries on a Xen host, checked without one: a fake loader stands in for
ctypes.CDLL, so the order of the names tried and the refusal message are pinned here."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile

import pytest

from xenstored.hypervisor import HypervisorError, xen


class FakeLoader:
    """Loads only the names in ``present``; records every name asked for."""

    def __init__(self, *present: str, broken: dict[str, str] | None = None) -> None:
        self.present = set(present)
        self.broken = broken or {}
        self.tried: list[str] = []

    def __call__(self, name: str) -> ctypes.CDLL:
        self.tried.append(name)
        if name in self.broken:
            raise OSError(self.broken[name])
        if name not in self.present:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return ctypes.CDLL(None)  # any loaded library will do as the stand-in


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xen, "_loaded", {})


def nothing_found(name: str) -> None:
    return None


def test_versioned_sonames_are_tried_newest_first_after_the_plain_name():
    loader = FakeLoader("libxenctrl.so.4.17")
    xen.load_library("xenctrl", loader=loader, find=nothing_found)
    assert loader.tried == ["libxenctrl.so", *(f"libxenctrl.so.4.{m}" for m in range(21, 16, -1))]


def test_find_librarys_answer_comes_first_and_is_used_when_it_loads():
    loader = FakeLoader("/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17")
    xen.load_library("xenctrl", loader=loader, find=lambda n: "/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17")
    assert loader.tried == ["/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17"]


def test_the_library_is_looked_up_once():
    loader = FakeLoader("libxenctrl.so.4.11")
    first = xen.load_library("xenctrl", loader=loader, find=nothing_found)
    n = len(loader.tried)
    assert n == 12 and loader.tried[-1] == "libxenctrl.so.4.11"
    assert xen.load_library("xenctrl", loader=loader, find=nothing_found) is first
    assert len(loader.tried) == n


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError("No usable temporary directory found"), OSError("gcc: not found"), RuntimeError("odd")],
)
def test_find_library_raising_is_not_fatal(error):
    def find(name: str) -> str:
        raise error

    loader = FakeLoader("libxenctrl.so.4.19")
    xen.load_library("xenctrl", loader=loader, find=find)
    assert loader.tried[-1] == "libxenctrl.so.4.19"


def test_find_library_without_a_writable_temp_dir_does_not_raise(monkeypatch: pytest.MonkeyPatch):
    # The real find_library, in the situation that makes its gcc fallback raise.
    monkeypatch.setenv("TMPDIR", "/nonexistent")
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("PATH", "/nonexistent")  # no ldconfig, no gcc either
    assert xen._find_library("surely-not-a-library-xs", ctypes.util.find_library) is None


def test_missing_library_refusal_names_it_and_the_debian_package():
    loader = FakeLoader()
    with pytest.raises(HypervisorError) as e:
        xen.load_library("xenctrl", loader=loader, find=nothing_found)
    msg = str(e.value)
    assert msg.startswith("cannot load Xen's library libxenctrl: tried libxenctrl.so, libxenctrl.so.4.21, ")
    assert "libxenctrl.so.4.11;" in msg
    assert msg.endswith("install the libxenmisc package of your Xen version (Debian 12: libxenmisc4.17)")
    assert len(loader.tried) == 12


def test_a_library_that_is_found_but_broken_says_why():
    broken = {"libxenctrl.so.4.17": "libxencall.so.1: cannot open shared object file: No such file or directory"}
    with pytest.raises(HypervisorError) as e:
        xen.load_library("xenctrl", loader=FakeLoader(broken=broken), find=nothing_found)
    assert "(libxencall.so.1: cannot open shared object file" in str(e.value)


def test_xen_backend_refuses_at_construction_before_opening_any_device(tmp_path):
    with pytest.raises(HypervisorError) as e:
        xen.XenHypervisor(str(tmp_path / "evtchn"), str(tmp_path / "gntdev"), loader=FakeLoader())
    assert "libxenmisc4.17" in str(e.value)
    loader = FakeLoader("libxenctrl.so")
    with pytest.raises(HypervisorError) as e:
        xen.XenHypervisor(str(tmp_path / "evtchn"), str(tmp_path / "gntdev"), loader=loader)
    assert str(e.value).startswith(f"cannot open {tmp_path}/evtchn: No such file or directory")


@pytest.mark.skipif(os.path.exists("/dev/xen/evtchn"), reason="a real Xen host")
def test_a_daemon_told_to_use_real_xen_without_it_refuses_in_one_line(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("emulate = false\n")
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    r = subprocess.run(
        [sys.executable, "-m", "xenstored", "-N", "--config", str(conf), "--rundir", rundir],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    try:
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        # Which refusal depends on what this machine has installed; both say what to do.
        assert "install the libxenmisc package" in lines[0] or "cannot open /dev/xen/evtchn" in lines[0]
        assert not os.path.exists(os.path.join(rundir, "socket"))
    finally:
        os.rmdir(rundir)
