"""xenvm.py's retry rule (no Xen needed): which failed boots count as the platform's crash.

A boot is retried only on a crash outside the daemon (README, Reliability).  The console lines
below are from real device runs: dom0's /init killed by a general protection fault (dom0 panics
before any dump), the daemon killed by one 0.04 s after a busybox process took its own, or by one
in plain interpreter code (the canary's kind of death).  The negative cases guard the other half
of the rule: a daemon that dies of an exception, of a fault the kernel alone reports, of one under
its native modules, or that faults *before* another process, is never the platform's."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xenvm import Line, Result, death_cause, platform_crashes  # tests/xen is not a package: import it by path


def result(*texts: str) -> Result:
    return Result(lines=[Line(float(i), t) for i, t in enumerate(texts)])


DIED = "XSVM DAEMON-DIED pid 134 (state 'reaped'); its log's last lines and the kernel's lines about it follow t=22.47"
BUSYBOX_GP = ("[   22.020659] traps: exe[415] general protection fault ip:433f4b sp:7ffc713cfdd0 error:0 "
              "in busybox[401000+184000]")
DAEMON_GP = ("[   22.064695] traps: python3[134] general protection fault ip:7f5961064930 sp:7ffdcec8fcc0 "
             "error:0 in libpython3.11.so.1.0[7f596105f000+23c000]")


def test_init_killed_by_a_fault_is_the_platform() -> None:
    res = result(
        "XSVM STAGE block-attach ok xl block-attach 3.3s t=49.60",
        "[   52.440750] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
        "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.",
    )
    assert platform_crashes(res) == ["[   52.440750] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b"]


def test_init_exiting_is_not_the_platform() -> None:
    # exit status 1 (0x100): the script ended, which is the harness's own bug
    res = result("[   52.440750] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
    assert platform_crashes(res) == []


def test_daemon_faulting_just_after_another_process_is_the_platform() -> None:
    res = result("XSVM STAGE pv-create ok domid=1 t=16.17", DIED, "XSVM-DUMP-BEGIN daemon-died", "== dmesg",
                 BUSYBOX_GP, DAEMON_GP, "XSVM-DUMP-END daemon-died", "XSVM PLATFORM dom0-segfaults=2 t=114.97")
    crashes = platform_crashes(res)
    assert len(crashes) == 1
    assert "the daemon (pid 134) died of a general protection fault 0.04s after exe (pid 415)" in crashes[0]


def test_daemon_faulting_alone_is_never_the_platform() -> None:
    # Its own fault may be its own doing (ctypes): even with dom0's segfault count raised by it.
    res = result(DIED, "== dmesg", DAEMON_GP, "XSVM PLATFORM dom0-segfaults=1 t=114.97")
    assert platform_crashes(res) == []


def test_daemon_dying_of_an_exception_is_never_the_platform() -> None:
    # No kernel line for the daemon, whatever else crashed around it.
    res = result(DIED, "== dmesg", BUSYBOX_GP, "Segmentation fault", "XSVM PLATFORM dom0-segfaults=1 t=30.0")
    assert platform_crashes(res) == []


def test_a_fault_after_the_daemons_or_long_before_it_does_not_count() -> None:
    # After: the daemon's death might have caused it.  Long before: an unrelated crash.
    later = "[   22.500000] xenstore-read[420]: segfault at 0 ip 00007f00 sp 00007ffc error 4 in libc.so.6"
    earlier = "[   12.000000] traps: sh[300] general protection fault ip:433f4b sp:7ffc error:0 in busybox"
    assert platform_crashes(result(DIED, earlier, DAEMON_GP, later)) == []


def test_the_daemons_own_two_faults_are_not_a_pair() -> None:
    # Its pid is the daemon's in both lines (dumped twice): not another process.
    assert platform_crashes(result(DIED, DAEMON_GP, DAEMON_GP)) == []


def test_a_dom0_process_segfault_without_daemon_death_is_the_platform() -> None:
    res = result("XSVM STAGE vbd-read FAIL exit 139 t=40", "Segmentation fault")
    assert platform_crashes(res) == ["Segmentation fault"]


def test_faulthandlers_report_dates_the_daemons_fault_by_dom0s_mark() -> None:
    # Under faulthandler the kernel logs no line for the daemon: dom0's mark (t=22.47, polled
    # every 0.25 s) says when, so the busybox fault at 22.02 s is at most 0.45 s before it.
    res = result(DIED, "XSVM-DUMP-BEGIN daemon-died", "Fatal Python error: Segmentation fault", "",
                 "Current thread 0x00007f9dd2232b80 (most recent call first):", "== dmesg", BUSYBOX_GP)
    crashes = platform_crashes(res)
    assert len(crashes) == 1
    assert "died of a segmentation fault at most 0.45s (dom0 noticed at 22.47s) after exe (pid 415)" in crashes[0]


def test_faulthandlers_report_with_no_fault_close_before_it_is_the_daemons() -> None:
    long_before = "[   19.000000] traps: exe[415] general protection fault ip:433f4b sp:7ffc error:0 in busybox"
    res = result(DIED, "Fatal Python error: Segmentation fault", long_before)
    assert platform_crashes(res) == []


def test_a_fatal_error_before_the_mark_is_not_this_deaths() -> None:
    # (an earlier daemon process's report, say, appended to the same log)
    res = result("Fatal Python error: Aborted", DIED, BUSYBOX_GP)
    assert platform_crashes(res) == []


RESTARTED_DIED = "XSVM DAEMON-DIED pid 586 (state 'reaped'); its log's last lines and the kernel's lines about it follow t=59.50"


def test_two_threads_with_one_id_in_the_daemons_report_is_the_platform() -> None:
    # run 13: the restarted daemon aborted in its new journal thread, alone (the nearest other
    # fault 10 s before), and faulthandler listed both threads under the main thread's id
    res = result(RESTARTED_DIED, "XSVM-DUMP-BEGIN daemon-died", "Fatal Python error: Aborted", "",
                 "Thread 0x00007ff9a8786b80 (most recent call first):", "  <no Python frame>", "",
                 "Thread 0x00007ff9a8786b80 (most recent call first):",
                 '  File "/usr/lib/python3.11/threading.py", line 327 in wait', "== dmesg",
                 "[   49.045105] exe[539]: segfault at 8 ip 0000000000433f4b sp 00007fffe3d89ae0 error 4 in busybox")
    crashes = platform_crashes(res)
    assert len(crashes) == 1 and "whose id 0x00007ff9a8786b80 is another thread's too" in crashes[0]


def test_a_lone_fault_in_interpreter_code_is_the_platforms() -> None:
    # run 12's kind: the canary (no ctypes, no device, no mapping) died the same way, as often
    res = result(RESTARTED_DIED, "Fatal Python error: Segmentation fault", "",
                 "Thread 0x00007fb483fbd6c0 (most recent call first):", '  File "journal.py", line 328 in _run', "",
                 "Current thread 0x00007fb48543cb80 (most recent call first):",
                 '  File "/usr/lib/python3.11/logging/__init__.py", line 1601 in makeRecord',
                 '  File "/host/work/main/xenstored/server.py", line 90 in run_socket_connection', "== dmesg")
    crashes = platform_crashes(res)
    assert len(crashes) == 1
    assert "died of a fault in interpreter code, makeRecord in logging/__init__.py:1601" in crashes[0]


def test_a_fault_under_the_daemons_native_work_is_the_daemons() -> None:
    for native in ("hypervisor/xen.py", "journal.py", "ring.py", "ringpump.py"):
        res = result(RESTARTED_DIED, "Fatal Python error: Segmentation fault", "",
                     "Current thread 0x00007fb48543cb80 (most recent call first):",
                     f'  File "/host/work/main/xenstored/{native}", line 160 in next_domain',
                     '  File "/host/work/main/xenstored/domains.py", line 300 in on_dom_exc', "== dmesg")
        assert platform_crashes(res) == [], native


def test_a_fault_with_no_python_frame_or_no_report_is_the_daemons() -> None:
    no_frame = result(RESTARTED_DIED, "Fatal Python error: Aborted", "",
                      "Current thread 0x00007fb48543cb80 (most recent call first):", "  <no Python frame>")
    assert platform_crashes(no_frame) == []
    cut = result(RESTARTED_DIED, "Fatal Python error: Segmentation fault", "", "== dmesg")
    assert platform_crashes(cut) == []


def test_an_exception_that_ends_the_daemon_is_never_retried() -> None:
    res = result(RESTARTED_DIED, "XSVM-DUMP-BEGIN daemon-died", "Traceback (most recent call last):",
                 '  File "/host/work/main/xenstored/service.py", line 290 in run', "ValueError: boom",
                 "XSVM-DUMP-END daemon-died")
    assert platform_crashes(res) == []


def test_a_corrupt_command_name_in_the_guests_shell_is_the_platform() -> None:
    # run 24: the guest's /init ran "xestore-watch" for xenstore-watch; its first watch was lost
    line = "guest: a watcher said: /init: line 61: xestore-watch: not found"
    assert platform_crashes(result("XSVM STAGE pv-guest-checks FAIL FAIL no-initial-watch-event t=43.10", line)) == [line]


def test_xenstore_watch_really_missing_in_the_guest_is_not_the_platform() -> None:
    line = "guest: a watcher said: /init: line 61: xenstore-watch: not found"
    assert platform_crashes(result(line)) == []


def test_the_summary_names_the_daemons_fatal_error_and_the_kernels_word() -> None:
    # CI keeps the summary and may cut the dumps: the cause must be in the summary's lines.
    res = result(DIED, "XSVM-DUMP-BEGIN daemon-died", "Fatal Python error: Segmentation fault", "",
                 "Current thread 0x00007f (most recent call first):",
                 '  File "/x/trio/_core/_run.py", line 2280 in unrolled_run', "== dmesg", DAEMON_GP,
                 "== trace", "IN 3 READ (/local/domain/0/name )", "XSVM-DUMP-END daemon-died")
    assert death_cause(res) == ["Fatal Python error: Segmentation fault",
                                "Current thread 0x00007f (most recent call first):",
                                '  File "/x/trio/_core/_run.py", line 2280 in unrolled_run', f"dmesg: {DAEMON_GP}"]


def test_the_summary_keeps_a_tracebacks_last_lines() -> None:
    log = [f"2026-12-06 INFO line {i}" for i in range(40)] + ["Traceback (most recent call last):",
                                                              "ValueError: the last words"]
    res = result(DIED, "XSVM-DUMP-BEGIN daemon-died", *log, "== dmesg", "== trace", "XSVM-DUMP-END daemon-died")
    cause = death_cause(res)
    assert cause[-1] == "ValueError: the last words" and len(cause) == 12
