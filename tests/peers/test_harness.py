"""The peer harness itself: readiness, failure reporting, teardown, and the UML boot recipe
(UML ↔ qemu-storage-daemon needs no code of ours, so it checks the recipe on its own)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import programs
from tests.peers.harness import PeerDied, Peers, build_c, socket_listening


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def gone_or_zombie(pid: int) -> bool:
    """Gone, or dead and not yet reaped; its /proc entry may vanish while it is read (init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_stop_escalates_to_sigkill_and_reaps_the_whole_group(peers: Peers) -> None:
    # A leader that ignores SIGTERM, with a child in its group that would outlive it.
    script = "import os,signal,time,subprocess,sys\n" \
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
             "c=subprocess.Popen(['sleep','300']); print('child', c.pid, flush=True)\n" \
             "time.sleep(300)\n"
    p = peers.start("stubborn", [sys.executable, "-c", script])
    child = int(p.wait_log(r"^child (\d+)").group(1))
    status = p.stop(timeout=0.3)
    assert status == -signal.SIGKILL
    assert gone(p.pid)
    # The child was in the same group: SIGKILLed too (it is reparented and reaped by init).
    p.wait_for(lambda: gone_or_zombie(child), "child gone", 5, allow_exit=True)
    assert p.stop() == status  # idempotent


def test_wait_fails_fast_with_log_tail_when_the_peer_dies(peers: Peers, tmp_path) -> None:
    p = peers.start("dies", ["sh", "-c", "echo 'cannot bind socket: boom' >&2; exit 3"])
    with pytest.raises(PeerDied, match=r"(?s)exited with 3.*cannot bind socket: boom"):
        p.wait_listening(tmp_path / "never.sock", timeout=10)


def test_wait_times_out_with_log_tail(peers: Peers) -> None:
    p = peers.start("silent", ["sh", "-c", "echo hello; sleep 30"])
    with pytest.raises(TimeoutError, match=r"(?s)no log line /ready/.*hello"):
        p.wait_log("ready", timeout=0.3)


@pytest.mark.peer
def test_qsd_raw_listens_and_stops_cleanly(peers: Peers) -> None:
    qsd = peers.qsd_raw(size=1 << 20)
    assert socket_listening(qsd.sock)
    assert qsd.image is not None and qsd.image.stat().st_size == 1 << 20
    status = qsd.process.stop()
    assert status == 0, qsd.process.log_tail()  # qsd exits 0 on SIGTERM
    assert gone(qsd.process.pid)
    assert not socket_listening(qsd.sock)


@pytest.mark.peer
def test_qsd_null_listens(peers: Peers) -> None:
    qsd = peers.qsd_null(size=1 << 20)
    assert socket_listening(qsd.sock)


@pytest.mark.peer
def test_testpmd_server_listens_and_says_bye(peers: Peers) -> None:
    p, sock = peers.testpmd()
    assert socket_listening(sock)
    p.wait_log(r"start packet forwarding")
    assert p.stop() == 0
    assert "Bye..." in p.log_text()


@pytest.mark.peer
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_uml_boot_recipe_against_qemu_storage_daemon(peers: Peers, tmp_path) -> None:
    """UML's virtio_uml + virtio_blk against qsd: UML writes a pattern that lands in the raw file,
    and reads back bytes the host put there."""
    qsd = peers.qsd_raw(size=4 << 20)
    assert qsd.image is not None
    host_bytes = os.urandom(8 * 512)
    with open(qsd.image, "r+b") as f:
        f.seek(100 * 512)
        f.write(host_bytes)
    pattern = os.urandom(16 * 512)
    (tmp_path / "pattern.bin").write_bytes(pattern)
    run = peers.uml(qsd.sock, mode="blkrw", env={
        "UMLT_PATTERN": str(tmp_path / "pattern.bin"), "UMLT_WSECTOR": "8",
        "UMLT_RSECTOR": "100", "UMLT_RCOUNT": "8",
    })
    verdicts = await run.finish(timeout=25)
    tail = run.process.log_tail(60)
    assert "DONE 0" in verdicts, tail
    assert run.value("SECTORS") == str((4 << 20) // 512), tail
    assert run.value("WRITE-READ-OK") == "16", tail
    assert run.value("READ-MD5") == hashlib.md5(host_bytes).hexdigest(), tail
    with open(qsd.image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(pattern)) == pattern


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_uml_guest_threads_keep_their_vector_registers(peers: Peers) -> None:
    """Two threads of one UML guest process each hold a pattern in the CPU's widest vector register
    (zmm31 with AVX-512, else ymm15) across 3,000 system calls that switch to the other thread and
    spins UML's timer may cut (tests/peers/uml_fpu_check.c): every round finds its own pattern.
    On an AVX-512 or AMX host UML itself cannot restore a guest's FPU state (its buffer is the
    size of an AVX-only XSAVE area): tests/peers/uml_xstate.c, which the harness preloads, keeps
    the rest per thread. Without it no guest process runs there; with the rest not kept, every
    round of this check finds zmm31 reset."""
    check = build_c(Path(__file__).with_name("uml_fpu_check.c"))
    qsd = peers.qsd_raw(size=1 << 20)
    run = peers.uml(qsd.sock, mode="probe", env={"UMLT_EXEC": str(check)})
    verdicts = await run.finish(timeout=40)
    tail = run.process.log_tail(40)
    assert "DONE 0" in verdicts and run.value("EXEC-RC") == "0", tail
    fpu = run.value("FPU")
    assert fpu is not None and (fpu == "none: the CPU has no AVX" or fpu.endswith("threads=2 rounds=3000 mismatches=0")), tail


@pytest.mark.parametrize(("release", "package"), [("bookworm", "qemu-system-common"), ("trixie", "qemu-utils")])
def test_missing_peer_skips_with_the_package_of_this_release(peers: Peers, monkeypatch, tmp_path, release,
                                                              package) -> None:
    monkeypatch.setattr(programs.shutil, "which", lambda name: None)
    monkeypatch.setattr(programs.os.path, "exists", lambda path: False)
    os_release = tmp_path / "os-release"
    os_release.write_text(f"ID=debian\nVERSION_CODENAME={release}\n")
    monkeypatch.setenv(programs.OS_RELEASE_ENV, str(os_release))
    monkeypatch.delenv(programs.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"qemu-storage-daemon not found: on Debian 1[23] \\({release}\\) "
                                                    f"it is in {package}; run `make deps`"):
        peers.qsd_raw()
    with pytest.raises(pytest.skip.Exception, match="dpdk-testpmd not found: .* it is in dpdk-dev"):
        peers.testpmd()
    assert peers.started == []


def test_missing_peer_fails_under_make_test(peers: Peers, monkeypatch) -> None:
    """`make test` ran `make deps` first: a peer that is still missing is a failure, not a skip."""
    monkeypatch.setattr(programs.shutil, "which", lambda name: None)
    monkeypatch.setenv(programs.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="qemu-storage-daemon not found: .*make test installed"):
        peers.qsd_raw()
    assert peers.started == []


def test_each_installed_package_provides_its_need_where_the_table_looks() -> None:
    """For every need whose package (on this release) is installed, the table's lookup finds it: the
    table's paths are the packages' real ones, so a skip or failure names the true cause."""
    release = programs.host_release()
    if release is None:
        pytest.skip("not a Debian release tests/tools/debian-packages.tsv knows")
    checked, wrong = [], []
    for need in programs.table().values():
        package = need.packages[release]
        installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                                   check=False).stdout.endswith("ok installed")
        if installed:
            checked.append(need.name)
            if programs.find(need.name) is None:
                wrong.append(f"{need.name} ({package})")
    assert checked and wrong == []
