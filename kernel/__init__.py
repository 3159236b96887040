"""Guest kernel: config fragments and the cached build from Debian's kernel source package
(linux-source-6.1 on Debian 12, linux-source-6.12 on Debian 13)."""
