"""The kernel source tarball is found whatever Debian release installed it (linux-source-6.1 on
Debian 12, linux-source-6.12 on Debian 13), the newest by version when there are several."""
import pytest

from kernel import build


def test_the_newest_debian_kernel_source_is_chosen(tmp_path):
    for name in ("linux-source-6.9.tar.xz", "linux-source-6.12.tar.xz",
                 "linux-source-6.1.tar.xz", "linux-source-6.13.tar.bz2", "linux-config-6.14.tar.xz"):
        (tmp_path / name).touch()
    assert build.kernel_source(tmp_path) == build.Source("linux-source-6.12",
                                                         tmp_path / "linux-source-6.12.tar.xz")


def test_no_kernel_source_names_the_packages(tmp_path):
    with pytest.raises(RuntimeError, match=r"linux-source-6\.1 on Debian 12, -6\.12 on Debian 13"):
        build.kernel_source(tmp_path)
