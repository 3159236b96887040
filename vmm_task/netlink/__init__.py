"""Pod networking inside the guest: interfaces and routes from grpc.SandboxService, applied with
pyroute2's asyncio API. pyroute2 costs ~0.2 s to import on a host (far more under TCG), so it is
imported only when a request actually changes the network, never at boot, and only its
`pyroute2.iproute` closure (in the guest the package imports nothing else: docs/guest-image.md)."""


def open_iproute():
    """A pyroute2 AsyncIPRoute (asyncio rtnetlink socket) for `async with`. The first call imports
    pyroute2 as PID 1 imports at start-up: with the collector off (its runs would find next to
    nothing to free among ~100 new modules), then what the import created, which lives as long
    as the agent, is frozen out of later collections (gc.freeze) before collection resumes."""
    import sys

    if "pyroute2.iproute" not in sys.modules:
        import gc

        was_enabled = gc.isenabled()
        gc.disable()
        try:
            import pyroute2.iproute  # noqa: F401
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()
    from pyroute2.iproute import AsyncIPRoute
    return AsyncIPRoute()
