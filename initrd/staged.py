"""A cache entry made whole or not at all: filled in a directory beside it, then renamed into
place, so a reader never meets half of one and builders racing for it need no lock."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_directory(root: Path):
    """Yield a new empty directory (0755) beside `root` to fill; when the block ends it becomes
    `root` by one rename (if another process got there first, theirs stays and ours goes); if the
    block raises, it is removed."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
    try:
        staging.chmod(0o755)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, root)
    except OSError:  # another process got there first
        shutil.rmtree(staging)
