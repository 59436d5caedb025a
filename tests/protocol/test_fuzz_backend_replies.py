"""A hostile back-end answers the front-end's requests with generated replies over a real
socketpair: plausible headers (right or wrong request code, flag bits, sizes that lie) with random
payloads and sometimes fds. The front-end must only raise the library's typed errors, never hang
(every await is bounded) and never leak an fd. ``make fuzz`` runs 20,000 examples; the sans-IO
fuzz in test_sans_io_pair.py covers 100,000 byte streams without sockets.
"""

from __future__ import annotations

import asyncio
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user import AsyncFrontend, FdSocket, VhostUserError
from vhost_user import ProtocolFeatures as PF
from vhost_user.state import Negotiation

from tests.conftest import open_fds

EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "150")) // 5  # each example is up to 5 exchanges
REQUESTS = ["get_features", "get_protocol_features", "get_queue_num", "get_config", "get_vring_base",
            "set_owner_ack", "get_status", "get_max_mem_slots", "get_inflight_fd"]

replies = st.tuples(
    st.sampled_from(REQUESTS),
    st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)),  # request code in the reply
    st.one_of(st.sampled_from([0x5, 0x1, 0x4, 0xD, 0x6]), st.integers(0, 2**32 - 1)),  # flags
    st.one_of(st.integers(0, 80), st.integers(0, 2**32 - 1)),  # declared size
    st.binary(max_size=96),  # payload actually sent
    st.integers(0, 3),  # fds attached
    st.booleans(),  # close the connection after the reply
    st.booleans(),  # REPLY_ACK in force
)


async def exchange(reply: tuple) -> None:  # type: ignore[type-arg]
    request, code, flags, size, payload, nfds, hang_up, ack = reply
    a, b = FdSocket.pair()
    fe = AsyncFrontend(a, timeout=0.2)
    try:
        # As if negotiation had happened (this test is about what comes back, not the handshake):
        # every feature-gated request passes its precondition; REPLY_ACK in some examples only.
        fe.conn.backend_features = 1 << 30
        fe.conn.protocol_features = PF.MQ | PF.CONFIG | PF.STATUS | PF.CONFIGURE_MEM_SLOTS | PF.INFLIGHT_SHMFD | (PF.REPLY_ACK if ack else PF(0))
        fe.conn.negotiation = Negotiation.PROTOCOL_SET
        call = {
            "get_features": fe.get_features, "get_protocol_features": fe.get_protocol_features,
            "get_queue_num": fe.get_queue_num, "get_config": lambda: fe.get_config(0, 16),
            "get_vring_base": lambda: fe.get_vring_base(0), "set_owner_ack": fe.set_owner,
            "get_status": fe.get_status, "get_max_mem_slots": fe.get_max_mem_slots,
            "get_inflight_fd": lambda: fe.get_inflight_fd(1, 64),
        }[request]
        task = asyncio.ensure_future(call())
        await asyncio.wait([task], timeout=0)  # let it send (or refuse locally: then nothing comes)
        if task.done():
            if task.exception() is not None and not isinstance(task.exception(), VhostUserError):
                raise task.exception()  # type: ignore[misc]
            return
        header = await asyncio.wait_for(b.recv(12), 5)
        if header[0]:
            _, _, asked = struct.unpack("<III", header[0])
            if asked:
                await asyncio.wait_for(b.recv(asked), 5)
        fds = [os.memfd_create("fuzz", os.MFD_CLOEXEC) for _ in range(nfds)]
        try:
            await b.send(struct.pack("<III", code, flags, size) + payload, fds)
        except VhostUserError:
            pass
        finally:
            for fd in fds:
                os.close(fd)
        if hang_up:
            b.close()
        try:
            got = await asyncio.wait_for(task, 5)
            if request == "get_inflight_fd":
                os.close(got.fd)  # a well-formed answer: the area's fd is the caller's
        except VhostUserError:
            pass
        except TimeoutError as e:  # pragma: no cover - the front-end's own timeout must fire first
            raise AssertionError("the front-end hung") from e
    except VhostUserError:
        pass
    finally:
        await fe.close()
        b.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies, min_size=1, max_size=5))
def test_hostile_replies_give_typed_errors_and_leak_nothing(batch):
    before = open_fds()
    for reply in batch:
        asyncio.run(exchange(reply))
    assert open_fds() <= before
