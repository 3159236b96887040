"""The README's figures block is replaced by the report's table, and nothing else changes."""
import pytest

from bench.readme import BEGIN, END, splice


def test_splice_replaces_only_the_marked_block():
    readme = f"# Title\n\n## Figures\n\n{BEGIN}\nold table\n{END}\n\n## Next\n"
    report = "# vmm-task benchmark report\n\n| key | median |\n|---|---|\n| `boot.ready_s` | 2.5 |\n"
    out = splice(readme, report)
    assert out == (f"# Title\n\n## Figures\n\n{BEGIN}\n| key | median |\n|---|---|\n"
                   f"| `boot.ready_s` | 2.5 |\n{END}\n\n## Next\n")
    assert splice(out, report) == out  # idempotent


def test_a_readme_without_markers_is_an_error():
    with pytest.raises(ValueError, match="figures:begin"):
        splice("# no block here\n", "| a |\n")
