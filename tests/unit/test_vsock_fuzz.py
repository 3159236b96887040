"""Fuzz: 10,000+ random descriptor chains (indexes, addresses, lengths, flags, avail jumps, packet
headers) from a hostile guest, fixed seed. Nothing may escape the device into the event loop,
the vhost-user session must survive, and a driver restart must bring back a working device."""

import asyncio
import random

from host_sandboxer.vsock.packet import HEADER, HOST_CID, OP_RST
from test_vhost_user_session import GUEST_CID, MEM_SIZE, TX_BUF_GPA, Session, run_async, until

SEED = 20261124
CHAINS = 10_000
PER_ROUND = 16


def random_address(rng: random.Random) -> int:
    return rng.choice([
        rng.randrange(0, MEM_SIZE),                 # anywhere in RAM, incl. the hole and the rings
        rng.randrange(MEM_SIZE - 64, MEM_SIZE + 64),  # across the end
        rng.randrange(0x9FF00, 0xC0100),           # across the hole between the two regions
        rng.getrandbits(64),                       # anywhere at all
        TX_BUF_GPA + rng.randrange(0, 0x1000),     # plausible
    ])


def random_length(rng: random.Random) -> int:
    return rng.choice([0, 1, 43, 44, 45, 4096, 65536 + 44, rng.getrandbits(32), rng.randrange(0, 0x2000)])


def random_packet(rng: random.Random) -> bytes:
    return HEADER.pack(rng.choice([GUEST_CID, GUEST_CID, rng.getrandbits(64)]),
                       rng.choice([HOST_CID, HOST_CID, rng.getrandbits(64)]),
                       rng.randrange(0, 8), rng.choice([rng.randrange(0, 8), rng.getrandbits(32)]),
                       random_length(rng), rng.choice([1, 1, 2, rng.getrandbits(16)]),
                       rng.randrange(0, 9), rng.getrandbits(32) if rng.random() < 0.2 else rng.randrange(0, 4),
                       rng.choice([0, 4096, 262144, rng.getrandbits(32)]), rng.getrandbits(32))


def garbage_chain(rng: random.Random, guest, q: int) -> int:
    for _ in range(rng.randrange(1, 4)):
        flags = rng.getrandbits(3) if rng.random() < 0.7 else rng.getrandbits(16)
        guest.set_desc(q, rng.randrange(guest.num), random_address(rng), random_length(rng), flags,
                       rng.choice([rng.randrange(guest.num), rng.getrandbits(16)]))
    return rng.randrange(guest.num) if rng.random() < 0.95 else rng.getrandbits(16)


def packet_chain(rng: random.Random, guest, q: int) -> int:
    """A well-formed chain carrying a random header (and maybe data): reaches the packet logic."""
    head, data = rng.sample(range(guest.num), 2)
    at = TX_BUF_GPA + 0x1000 * rng.randrange(8)
    guest.mem[at:at + 44] = random_packet(rng)
    if rng.random() < 0.5:
        guest.set_desc(q, head, at, 44, 0)
    else:
        guest.set_desc(q, head, at, 44, 1, data)
        guest.set_desc(q, data, at + 0x100, rng.choice([1, 100, 3000]), rng.choice([0, 2]))
    return head


def looping_chain(rng: random.Random, guest, q: int) -> int:
    ids = rng.sample(range(guest.num), rng.randrange(1, 6))
    for i, nxt in zip(ids, ids[1:] + [rng.choice(ids)]):
        guest.set_desc(q, i, TX_BUF_GPA, 44, 1 | rng.choice([0, 2]), nxt)
    return ids[0]


def scribble(rng: random.Random, guest, q: int) -> None:
    """One hostile chain on queue `q`; sometimes an absurd avail idx."""
    make = rng.choices([garbage_chain, packet_chain, looping_chain], [6, 3, 1])[0]
    head = make(rng, guest, q)
    if rng.random() < 0.03:
        guest.avail[q] = rng.getrandbits(16)
    guest.make_avail(q, head)


@run_async
async def test_random_descriptor_chains_never_escape_the_device(caplog):
    rng = random.Random(SEED)
    loop = asyncio.get_running_loop()
    escaped = []
    loop.set_exception_handler(lambda loop, context: escaped.append(context))
    bystander = await Session().start()      # another VM's device on the same loop
    s = await Session(dial=lambda port: None).start()
    g = s.guest
    failures = chains = 0
    while chains < CHAINS:
        for _ in range(PER_ROUND):
            scribble(rng, g, rng.choice([0, 1, 1]))
            chains += 1
        g.notify(0)
        g.notify(1)
        for _ in range(3):
            await asyncio.sleep(0)
        if s.device.broken:
            failures += 1
            await g.stop_driver()
            await g.start_driver()
            await until(lambda: s.device.running, what="restart after a device reset")
            g.post_rx()
        assert not escaped, escaped[0]
        assert s.closed_reason is None
    assert failures > 100, "the fuzz should hit malformed rings often"
    reasons = " ".join(r.getMessage() for r in caplog.records)
    for kind in ("outside guest RAM", "loops", "next", "head", "ahead", "readable descriptor after"):
        assert kind in reasons, f"the fuzz never produced a '{kind}' ring"
    assert "reset guest port" in reasons or "dropped a packet" in reasons, "no packet got past the rings"
    # The device still works: a REQUEST to a port nobody serves gets its RST.
    await g.stop_driver()
    await g.start_driver()
    await until(lambda: s.device.running)
    g.post_rx()
    g.send(1234, 80, 1)
    await until(lambda: any(p[0][6] == OP_RST and p[0][3] == 1234 for p in g.received()), what="RST")
    assert not escaped
    s.close()
    assert bystander.device.running and bystander.device.broken is None
    bystander.guest.send(1234, 80, 1)
    await until(lambda: any(p[0][6] == OP_RST for p in bystander.guest.received()), what="bystander RST")
    bystander.close()
