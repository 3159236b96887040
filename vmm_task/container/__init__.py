"""Containers inside the agent: the OCI runtime CLI (crun/runc), bundles and rootfs mounts, the
process table, stdio, cgroup stats and OOM watching. `vmm_task/services/task.py` maps the
containerd Task API onto `ContainerTable`; nothing here imports ttrpc or the generated protos
except `stats.py`/`events` builders, so the layer is testable on its own."""
