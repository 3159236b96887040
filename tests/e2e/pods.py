"""Pods and containers of one scenario, made through crictl on one runtime handler and removed
after it the way kubelet does (stopp, then rmp); a teardown that fails is the scenario's error."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import stand_in_images
from crictl import Crictl

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    """The first truthy `probe()`; an AssertionError naming `what` (and the last error) if none
    comes within `timeout`."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            result = probe()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - kept for the message: what went wrong last
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last error: {last})")
        time.sleep(interval)


@dataclass
class Pod:
    crictl: Crictl
    id: str
    config: dict
    containers: list[str] = field(default_factory=list)

    def container(self, name: str, command: list[str] | None = None,
                  image: str = stand_in_images.BUSYBOX.name, start: bool = True, **extra) -> str:
        """Create (and by default start) a container in this pod; its id."""
        cid = self.crictl.create(self.id, self.crictl.container_config(name, image, command, **extra),
                                 self.config)
        self.containers.append(cid)
        if start:
            self.crictl.start(cid)
        return cid

    def wait_exited(self, cid: str, timeout: float = 60.0) -> dict:
        """The container's inspect `status` once it exited."""
        return wait_for(lambda: (status := self.crictl.inspect(cid)["status"])["state"] == "CONTAINER_EXITED"
                        and status, f"container {cid[:12]} to exit", timeout)

    @property
    def ip(self) -> str:
        """The pod IP, from the status kubelet reads (not verbose)."""
        return self.crictl.inspectp(self.id, verbose=False)["status"]["network"]["ip"]


class Pods:
    """The pods of one scenario on `runtime` (conftest.RUNTIMES)."""

    def __init__(self, crictl: Crictl, runtime: str):
        self.crictl, self.runtime = crictl, runtime
        self.started: list[Pod] = []

    def run(self, name: str, **extra) -> Pod:
        config = self.crictl.pod_config(f"{name}-{self.runtime}", **extra)
        pod = Pod(self.crictl, self.crictl.runp(config, self.runtime), config)
        self.started.append(pod)
        return pod

    def remove(self, pod: Pod) -> None:
        self.crictl.stopp(pod.id)
        self.crictl.rmp(pod.id)
        self.started.remove(pod)

    def close(self) -> None:
        """Remove every pod left; a pod whose first removal fails gets two more tries (so that
        it does not stay on the node for the next scenarios), and the first error is raised."""
        errors = []
        for pod in reversed(list(self.started)):
            for attempt in range(3):
                try:
                    self.remove(pod)
                    break
                except Exception as e:  # noqa: BLE001 - every pod is tried, then all errors reported
                    if attempt == 0:
                        errors.append(str(e))
                    time.sleep(3)
        if errors:
            raise AssertionError("removing the scenario's pods failed:\n" + "\n".join(errors))
