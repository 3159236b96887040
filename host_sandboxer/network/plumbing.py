"""Take over the pod's links for the VM (attach) and give them back (detach).

For each link of the pod namespace (see inspect.py): a tap in that namespace, opened there so
QEMU, running in the host namespace, gets it as fds; tc ingress + mirred both ways between the
link and its tap.  What is about to be made is written to a record file first, so `detach`
works from the record alone: after a failed attach, a Stop, a VMM death or a daemon crash.
Nothing here changes the links the CNI made besides their ingress qdisc.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from host_sandboxer.network import redirect, tap
from host_sandboxer.network.errors import NamespaceGone, NetworkError
from host_sandboxer.network.inspect import PodNetwork, read_network
from host_sandboxer.network.netns import in_netns
from host_sandboxer.network.pyroute import IPRoute, NetlinkError
from host_sandboxer.vmm.cmdline import TapNic

log = logging.getLogger(__name__)


def tap_name(position: int) -> str:
    return f"tap{position}_vmm"


@dataclass
class Attachment:
    """What attach made: the NICs for QEMU (their fds are ours until `close_fds`) and the
    network the guest must configure."""

    network: PodNetwork
    nics: list[TapNic] = field(default_factory=list)

    def close_fds(self) -> None:
        """Once QEMU holds the taps (or will never run): the taps now live as long as QEMU."""
        for nic in self.nics:
            tap.close_fds(list(nic.fds))
        self.nics = [TapNic(nic.id, nic.mac, ()) for nic in self.nics]


async def attach(netns_path: str, queues: int, record: Path) -> Attachment:
    """Plumb every link of the namespace at `netns_path` to a tap with `queues` queues.
    NetworkError (and nothing left behind) if the namespace or a link cannot be taken over."""
    work = asyncio.ensure_future(in_netns(netns_path, lambda: _attach(netns_path, queues, record)))
    try:
        return await asyncio.shield(work)
    except BaseException as exc:
        await _undo(work, record, netns_path)
        if isinstance(exc, (NetlinkError, OSError)):
            raise NetworkError(f"network namespace {netns_path}: {exc}") from None
        raise


async def _undo(work: asyncio.Future, record: Path, netns_path: str) -> None:
    """After a failure, or a cancellation while the namespace thread still runs: let it end,
    close the taps it may have opened, remove whatever it made."""
    await asyncio.wait({work})
    if not work.cancelled() and work.exception() is None:
        work.result().close_fds()
    try:
        await detach(record)
    except Exception:
        log.exception("network namespace %s: undoing a failed attach failed", netns_path)


async def detach(record: Path) -> None:
    """Undo what `record` says attach made; idempotent. A namespace already gone (the CNI
    deleted it) took everything in it along."""
    try:
        made = json.loads(record.read_text())
    except FileNotFoundError:
        return
    netns_path = made["netns"]
    try:
        await in_netns(netns_path, lambda: _detach(made["links"]))
    except NamespaceGone:
        pass
    except NetlinkError as e:
        raise NetworkError(f"network namespace {netns_path}: teardown: {e.args[-1]}") from None
    record.unlink(missing_ok=True)


def _attach(netns_path: str, queues: int, record: Path) -> Attachment:
    with IPRoute() as ipr:
        network = read_network(ipr, netns_path)
        plan = [{"name": link.name, "index": link.index, "tap": tap_name(n)}
                for n, link in enumerate(network.links)]
        _check_free(ipr, netns_path, plan)
        _write_record(record, {"netns": netns_path, "links": plan})
        attachment = Attachment(network)
        try:
            for step, link in zip(plan, network.links):
                attachment.nics.append(_plug(ipr, netns_path, step, link.mac, link.mtu, queues))
        except BaseException:
            attachment.close_fds()
            raise
        return attachment


def _check_free(ipr, netns_path: str, plan: list[dict]) -> None:
    """Refuse before changing anything if a tap name is taken or a link already has an ingress
    qdisc (someone else's: detach would delete it)."""
    for step in plan:
        if ipr.link_lookup(ifname=step["tap"]):
            raise NetworkError(f"network namespace {netns_path}: a link named {step['tap']} "
                               "already exists")
        if redirect.has_ingress(ipr, step["index"]):
            raise NetworkError(f"network namespace {netns_path}: interface {step['name']} already "
                               "has an ingress qdisc; cannot redirect it to the VM")


def _plug(ipr, netns_path: str, step: dict, mac: str, mtu: int, queues: int) -> TapNic:
    what = f"network namespace {netns_path}: interface {step['name']}"
    try:
        fds = tap.open_tap(step["tap"], queues)
    except OSError as e:
        raise NetworkError(f"{what}: cannot create tap {step['tap']}: {e.strerror}") from None
    try:
        (tap_index,) = ipr.link_lookup(ifname=step["tap"])
        ipr.link("set", index=tap_index, mtu=mtu, state="up")
        redirect.redirect_ingress(ipr, step["index"], tap_index)
        redirect.redirect_ingress(ipr, tap_index, step["index"])
    except NetlinkError as e:
        tap.close_fds(fds)
        raise NetworkError(f"{what}: tc redirect to {step['tap']}: {e.args[-1]}") from None
    except BaseException:
        tap.close_fds(fds)
        raise
    return TapNic(id=step["tap"], mac=mac, fds=tuple(fds))


def _detach(links: list[dict]) -> None:
    with IPRoute() as ipr:
        for step in links:
            if _link_name(ipr, step["index"]) == step["name"]:
                redirect.remove_ingress(ipr, step["index"])
            for tap_index in ipr.link_lookup(ifname=step["tap"]):
                redirect.remove_ingress(ipr, tap_index)
                with contextlib.suppress(NetlinkError):  # gone meanwhile: QEMU just closed it
                    ipr.link("del", index=tap_index)


def _link_name(ipr, index: int) -> str | None:
    try:
        return ipr.get_links(index)[0].get("IFLA_IFNAME")
    except NetlinkError:
        return None


def _write_record(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)
