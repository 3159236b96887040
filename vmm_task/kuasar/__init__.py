"""Kuasar's host conventions (kuasar-io/kuasar vmm/sandbox), which a Task request following them
carries in the shared directory instead of in its fields: the bundle and its io/storage files
(convention.py), volumes the guest mounts itself (storages.py, block devices: pci.py) and stdio
over hot-plugged virtio-serial ports (virtio_ports.py). docs/kuasar.md puts them beside ours."""
