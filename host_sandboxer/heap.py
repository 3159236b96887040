"""Give the daemon's free heap back to the kernel.

glibc returns freed memory to the kernel only from the top of its heap; what a pod's start or
shutdown frees in the middle (protobuf and gRPC buffers, Python objects over 512 bytes) stays
resident, counted in the daemon's PSS, until a later allocation reuses it. `malloc_trim(0)`
releases every free page (madvise); it takes well under a millisecond on a heap this size and
runs after the calls that churn memory most. Measured: docs/benchmarks.md, "Host memory".
"""
import ctypes

# The process's own symbols (dlopen(NULL)) include libc's; a libc without malloc_trim (musl)
# has nothing to trim this way.
_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_heap() -> None:
    if _TRIM is not None:
        _TRIM(0)
