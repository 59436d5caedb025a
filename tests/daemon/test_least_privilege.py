"""Least privilege: back-end peers are checked with SO_PEERCRED; privcmd/evtchn are restricted."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.device import DeviceError
from xen_vhost_master.supervisor import Options, Supervisor

NOBODY = 65534
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one "nobody" may execute
CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another user")
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_peer_of_another_user_is_refused_unless_allowed(platform):
    where = tempfile.mkdtemp(prefix="xvm-cred-")  # pytest's tmp_path is not reachable by "nobody"
    os.chmod(where, 0o755)
    path = os.path.join(where, "b.sock")
    listener = UnixListener(path)
    os.chmod(path, 0o666)  # the runtime dir is 0700 in production; open it to test the next line of defence
    peers = []
    try:
        for allowed in ((), (NOBODY,)):
            sup = Supervisor(Options(domid=1, backend_uids=allowed), platform)
            peers.append(subprocess.Popen([PYTHON, "-c", CONNECT, path], user=NOBODY))
            fe = await AsyncFrontend.accept(listener, accept_timeout=10)
            if allowed:
                sup._check_peer(fe, path)
                await fe.close()
            else:
                with pytest.raises(DeviceError, match=f"uid {NOBODY}"):
                    sup._check_peer(fe, path)
                await asyncio.sleep(0)  # let the scheduled close run
        mine = AsyncFrontend(await _connect_self(path, listener))
        Supervisor(Options(domid=1), platform)._check_peer(mine, path)  # our own uid is fine
        await mine.close()
    finally:
        listener.close()
        for p in peers:
            p.kill()
            p.wait(10)
        shutil.rmtree(where, ignore_errors=True)


async def _connect_self(path, listener):
    import socket

    client = socket.socket(socket.AF_UNIX)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, path)
    server = await listener.accept(10)
    client.close()
    return server
