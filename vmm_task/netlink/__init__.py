"""Pod networking inside the guest: interfaces and routes from grpc.SandboxService, applied with
pyroute2's asyncio API. pyroute2 costs ~0.2 s to import on a host (far more under TCG), so it is
imported only when a request actually changes the network, never at boot."""
