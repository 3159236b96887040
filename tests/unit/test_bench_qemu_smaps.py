"""The per-pod host memory and guest RAM figures read QEMU's smaps: the TCG translation cache is
its anonymous rwx mapping, the guest RAM its memfd (text as Linux writes it, from a real QEMU 7.2)."""
from bench.guest_mem import ram_resident_kb
from bench.sandboxer import qemu_pss_kb

SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234   /usr/bin/qemu-system-x86_64
Rss:                1024 kB
Pss:                 300 kB
7f0000000000-7f0020000000 rw-s 00000000 00:01 99     /memfd:memory-backend-memfd (deleted)
Rss:               44864 kB
Pss:               44864 kB
7f1000000000-7f1040000000 rwxp 00000000 00:00 0 
Rss:               12288 kB
Pss:               12288 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0 
Rss:                 500 kB
Pss:                 500 kB
7f3000000000-7f3000b00000 r--s 00000000 08:01 777    /work/build/guest/rootfs.img
Rss:                9000 kB
Pss:                 900 kB
"""


def test_the_tcg_cache_is_the_anonymous_rwx_mapping():
    assert qemu_pss_kb(SMAPS) == (300 + 44864 + 12288 + 500 + 900, 12288)


def test_the_guest_ram_is_the_memfd_mapping():
    assert ram_resident_kb(SMAPS) == 44864
