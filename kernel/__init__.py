"""Guest kernel: config fragments and the cached build from Debian's linux-source-6.1."""
