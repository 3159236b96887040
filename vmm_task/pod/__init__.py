"""Pod-level state set up by grpc.SandboxService/SetupSandbox: the pod config, its namespaces
and the files (hosts, resolv.conf) its containers share."""
