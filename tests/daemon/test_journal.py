"""journald-native stderr: when ``$JOURNAL_STREAM`` names stderr (systemd.exec(5)), every line starts
with its ``<N>`` syslog priority (sd-daemon(3)) and carries no level name, so ``journalctl -p err``
finds the errors; run by hand, lines are as before. A stub journal stream stands in for journald:
a Unix stream socket (what journald hands a service) whose ``st_dev:st_ino`` the test puts in
``$JOURNAL_STREAM``, read back line by line.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import socket
import subprocess

import pytest

from tests.daemon.test_daemon_cli import BIN, DOMID, TIMEOUT, start_sim, stop
from xen_vhost_master.log import JournalFormatter, say, stderr_is_journal
from xen_vhost_sim.guest import SimControl

DAEMON = str(BIN / "xen-vhost-master")
PRIORITY = re.compile(r"^<([0-7])>")


def journal_id(sock: socket.socket) -> str:
    st = os.fstat(sock.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def run_into_journal(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """Run the daemon with stderr a stub journal stream; its return code and the lines it wrote."""
    journal, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with journal, theirs:
        proc = subprocess.run([DAEMON, *args], env={**env, "JOURNAL_STREAM": journal_id(theirs)},
                              stderr=theirs.fileno(), stdout=subprocess.DEVNULL, timeout=TIMEOUT, check=False)
        theirs.close()
        data = b""
        while chunk := journal.recv(65536):
            data += chunk
    return proc.returncode, data.decode().splitlines()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_errors_reach_the_journal_at_priority_3_and_every_line_has_a_priority(sim_dir, tmp_path):
    sim, sim_path = start_sim(sim_dir)
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    serve = ("--domain", str(DOMID), "--runtime-dir", str(tmp_path / "run"))
    try:
        with SimControl(sim_path) as ctl:
            ctl.set_host(ioreq_server=False)
            code, lines = await asyncio.to_thread(run_into_journal, env, *serve)
        assert code == 76
        assert all(PRIORITY.match(line) for line in lines), lines
        # what `journalctl -p err` shows: the priority-3 lines (and more urgent), here the one error
        errors = [line for line in lines if int(PRIORITY.match(line)[1]) <= 3]  # type: ignore[index]
        assert errors == [f"<3>xen_vhost_master: dom{DOMID}: Xen has no IOREQ server (dm_op create_ioreq_server: "
                          "ENOSYS): rebuild Xen with CONFIG_IOREQ_SERVER=y (see README Requirements)"]
        assert lines[0] == f"<6>xen_vhost_master: platform: SIMULATED Xen host at {sim_path} (xen-vhost-sim), not /dev/xen"

        # a command's verdict, printed outside logging, carries its priority too
        code, lines = await asyncio.to_thread(run_into_journal, env, "--domain", "nosuch", "--runtime-dir", str(tmp_path))
        assert (code, lines[-1]) == (69, "<3>xen-vhost-master: no domain named 'nosuch'")

        # by hand (JOURNAL_STREAM is another stream's): no prefixes, the level's name as before
        r = await asyncio.to_thread(subprocess.run, [DAEMON, "--domain", "nosuch", "--runtime-dir", str(tmp_path)],
                                    env={**env, "JOURNAL_STREAM": "1:1"}, capture_output=True, text=True,
                                    timeout=TIMEOUT, check=False)
        assert r.stderr.splitlines()[0].startswith("INFO xen_vhost_master: platform: ")
        assert r.stderr.splitlines()[-1] == "xen-vhost-master: no domain named 'nosuch'"
    finally:
        stop(sim)


def test_a_traceback_has_the_priority_on_each_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord("xen_vhost_master", logging.ERROR, __file__, 1, "device %d: failed", (3,),
                                   exc_info=__import__("sys").exc_info())
    lines = JournalFormatter().format(record).split("\n")
    assert lines[0] == "<3>xen_vhost_master: device 3: failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-2:] == ["<3>RuntimeError: boom", "<3>second line"]
    for level, priority in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.CRITICAL, 2)):
        record = logging.LogRecord("x", level, __file__, 1, "m", (), None)
        assert JournalFormatter().format(record) == f"<{priority}>x: m"


def test_a_crash_reaches_the_journal_line_by_line_at_priority_2() -> None:
    journal, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = ("import logging; from xen_vhost_master.log import setup_logging; setup_logging(logging.INFO); "
            "raise RuntimeError('a bug')")
    with journal, theirs:
        proc = subprocess.run([str(BIN / "python3"), "-c", code], env={**os.environ, "JOURNAL_STREAM": journal_id(theirs)},
                              stderr=theirs.fileno(), timeout=TIMEOUT, check=False)
        theirs.close()
        lines = journal.makefile("rb").read().decode().splitlines()
    assert proc.returncode == 1
    assert lines[0] == "<2>xen_vhost_master: uncaught exception (a bug)"
    assert lines[-1] == "<2>RuntimeError: a bug" and all(line.startswith("<2>") for line in lines), lines


def test_stderr_is_the_journal_only_when_journal_stream_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a, b, open(a.fileno(), "w", closefd=False) as stream:
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": journal_id(a)})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": journal_id(b)})  # another stream
        assert not stderr_is_journal(stream, {})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:1"})  # no fd at all
    out = io.StringIO()
    say("hello", stream=out)
    assert out.getvalue() == "xen-vhost-master: hello\n"
