"""tc ingress + mirred: every frame arriving on one link leaves through the other, both ways.

What Kata and Kuasar call tc-redirect: the pod's veth keeps its name, MAC and addresses as the
CNI made them, but its traffic is handed to the tap (and so to the VM) before the namespace's
IP stack sees it.  u32 with an empty key matches every frame (matchall is not built into every
kernel; u32 is).
"""
from __future__ import annotations

from host_sandboxer.network.pyroute import NetlinkError

INGRESS = 0xFFFF0000  # "ffff:"
ETH_P_ALL = 0x0003
FILTER_PRIO = 49152
ENOENT, EINVAL, ENODEV = 2, 22, 19


def has_ingress(ipr, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") in ("ingress", "clsact") for q in ipr.get_qdiscs(index=index))


def redirect_ingress(ipr, source: int, target: int) -> None:
    """Frames entering link `source` are sent out of link `target`."""
    ipr.tc("add", "ingress", index=source, handle=INGRESS)
    ipr.tc("add-filter", "u32", index=source, parent=INGRESS, prio=FILTER_PRIO,
           protocol=ETH_P_ALL, target=0x10000, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": target})


def remove_ingress(ipr, index: int) -> None:
    """Delete the ingress qdisc (and with it every filter on it); absent is fine."""
    try:
        ipr.tc("del", "ingress", index=index, handle=INGRESS)
    except NetlinkError as e:
        if e.code not in (ENOENT, EINVAL, ENODEV):
            raise

