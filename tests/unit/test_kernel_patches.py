"""The kernel patches are applied to the shared, unpacked source for one build and reverted after
it, so another worktree's build (another cache key) finds the source as Debian ships it."""
import subprocess

import pytest

from kernel import build

ORIGINAL = "one\ntwo\nthree\n"
PATCHED = "one\n2\nthree\n"


@pytest.fixture
def tree_and_patch(tmp_path):
    tree, work = tmp_path / "tree", tmp_path / "work"
    for root, text in ((tree, ORIGINAL), (work, PATCHED)):
        (root / "a").mkdir(parents=True)
        (root / "a" / "f.txt").write_text(text)
    diff = subprocess.run(["diff", "-u", "--label", "a/a/f.txt", "--label", "b/a/f.txt",
                           str(tree / "a" / "f.txt"), str(work / "a" / "f.txt")],
                          capture_output=True, text=True).stdout
    patch = tmp_path / "x.patch"
    patch.write_text("What it changes, and why.\n\n" + diff)
    return tree, patch


def test_applied_for_the_build_and_reverted_after(tree_and_patch, tmp_path):
    tree, patch = tree_and_patch
    with open(tmp_path / "log", "w") as log, build.patched(tree, [patch], log):
        assert (tree / "a" / "f.txt").read_text() == PATCHED
    assert (tree / "a" / "f.txt").read_text() == ORIGINAL
    assert sorted(p.name for p in (tree / "a").iterdir()) == ["f.txt"]  # no .orig or .rej left


def test_reverted_when_the_build_fails(tree_and_patch, tmp_path):
    tree, patch = tree_and_patch
    with pytest.raises(RuntimeError, match="build failed"):
        with open(tmp_path / "log", "w") as log, build.patched(tree, [patch], log):
            raise RuntimeError("build failed")
    assert (tree / "a" / "f.txt").read_text() == ORIGINAL


def test_left_applied_by_a_killed_build_is_taken_as_applied(tree_and_patch, tmp_path):
    tree, patch = tree_and_patch
    (tree / "a" / "f.txt").write_text(PATCHED)
    with open(tmp_path / "log", "w") as log, build.patched(tree, [patch], log):
        assert (tree / "a" / "f.txt").read_text() == PATCHED
    assert (tree / "a" / "f.txt").read_text() == ORIGINAL


def test_a_patch_that_does_not_apply_is_named_and_leaves_the_tree(tree_and_patch, tmp_path):
    tree, patch = tree_and_patch
    (tree / "a" / "f.txt").write_text("something else\n")
    with pytest.raises(RuntimeError, match="x.patch does not apply"):
        with open(tmp_path / "log", "w") as log, build.patched(tree, [patch], log):
            pass
    assert sorted(p.name for p in (tree / "a").iterdir()) == ["f.txt"]
    assert (tree / "a" / "f.txt").read_text() == "something else\n"


def test_the_patches_apply_to_debians_source():
    """This source package's patches apply cleanly to it when it is unpacked here (the build
    unpacks it; skipped before the first build). A build running meanwhile has them applied."""
    source = build.kernel_source()
    trees = sorted((build.default_cache() / "kernel" / "src").glob(f"*/{source.package}"))
    if not trees:
        pytest.skip("no unpacked kernel source (make guest-image unpacks it)")
    for patch in build.patch_paths(source):
        checks = (["--dry-run"], ["--dry-run", "--reverse"])
        assert any(subprocess.run(["patch", "-p1", "--force", "--silent", *flags, "-i", str(patch)],
                                  cwd=trees[-1], capture_output=True).returncode == 0 for flags in checks), patch
