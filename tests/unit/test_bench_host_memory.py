"""bench.host_memory: Pss by mapping adds up; a module's heap is its own, not its importer's."""
import os
import sys

from bench.host_memory import by_mapping, by_module


def test_mappings_add_up_to_the_rollup():
    sizes, rollup = by_mapping(os.getpid())
    assert set(rollup) == {"Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"}
    assert abs(sum(sizes.values()) - rollup["Pss"]) <= rollup["Pss"] // 10  # read a moment apart
    assert any(name.endswith(".so") or "python" in name for name in sizes)


def test_each_module_is_charged_its_own_heap(tmp_path, monkeypatch):
    (tmp_path / "hm_outer.py").write_text("import hm_inner\nsmall = [0] * 1000\n")
    (tmp_path / "hm_inner.py").write_text("big = [bytes(1000) for _ in range(2000)]\n")  # ~2 MB
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        own = by_module(["hm_outer"])
    finally:
        sys.modules.pop("hm_outer", None)
        sys.modules.pop("hm_inner", None)
    assert 1900 <= own["hm_inner"] <= 2600
    assert own["hm_outer"] < 200
