"""vmm-sandboxer: the host daemon (Sandbox API, Task API forwarding, QEMU, vsock). See docs/internals.md."""
