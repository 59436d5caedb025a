"""A device whose start failed on this host (an OSError: a socket it may not open yet, fds or
memory short) is tried again with the waiting device's backoff, not failed for good until
xenstore changes; a back-end refused for good stays failed (test_waiting_backend.py)."""

from __future__ import annotations

import errno
import os

import pytest

from tests.daemon.test_waiting_backend import DOMID, Backend, guest_domain, running
from vhost_user import AsyncFrontend
from xen_vhost_master import supervisor
from xen_vhost_master.supervisor import Options


@pytest.mark.asyncio
async def test_a_device_whose_start_failed_is_tried_again_and_then_served(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, monkeypatch):
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    real = supervisor._connect_once
    tries: list[str] = []

    async def denied_once(path: str) -> AsyncFrontend:
        tries.append(path)
        if len(tries) == 1:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return await real(path)

    monkeypatch.setattr(supervisor, "_connect_once", denied_once)
    try:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            d = daemon.device(0)
            assert d["backend"] == "connected" and d["attempts"] == 2 and len(tries) == 2
    finally:
        await backend.stop()
