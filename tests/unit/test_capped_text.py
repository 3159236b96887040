"""Guest text the host quotes is capped, and the cut is marked."""
from vmm_common.capped_text import MAX_CHARS, capped


def test_short_text_is_kept_and_long_text_is_cut_with_a_marker():
    assert capped("container c1 not found") == "container c1 not found"
    assert capped("x" * MAX_CHARS) == "x" * MAX_CHARS
    assert capped("abcdef", 4) == "abcd… [2 more characters cut]"
    long = capped("y" * (4 << 20))
    assert long.startswith("y" * MAX_CHARS) and long.endswith(f"[{(4 << 20) - MAX_CHARS} more characters cut]")
