"""Guest initrd: deterministic cpio, agent build, assembly, manifest, floor image."""
