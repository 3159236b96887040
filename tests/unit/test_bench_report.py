"""bench.report on fake samples: spreads, nesting, missing keys, the markdown table."""

import pytest

from bench import report


def full_inputs():
    samples = {key: [3.0, 1.0, 2.0] for key in report.REQUIRED_KEYS if key != "io.stdout_integrity"}
    samples["boot.ready_s"] = [4.0, 1.0, 2.0, 10.0]
    for key in ("image.initrd_bytes", "image.kernel_bytes", "image.agent_bytes"):
        del samples[key]
    exact = {"image.initrd_bytes": 9_000_000, "image.kernel_bytes": 5_000_000,
             "image.agent_bytes": 20_000_000, "io.stdout_integrity": True,
             "agent.source": "/proc/1/smaps_rollup read by ExecVMProcess"}
    machine = {"date": "2026-11-24T04:00:00+00:00", "cores": 2, "accel": "tcg",
               "load_avg_start": [6.5, 6.0, 5.0], "runs": 3}
    return samples, exact, machine


def test_spread_is_median_min_max_n():
    assert report.spread([5, 1, 3]) == {"median": 3, "min": 1, "max": 5, "n": 3}
    assert report.spread([4.0, 1.0, 2.0, 10.0]) == {"median": 3.0, "min": 1.0, "max": 10.0, "n": 4}
    assert report.spread([0.12345]) == {"median": 0.123, "min": 0.123, "max": 0.123, "n": 1}
    with pytest.raises(ValueError):
        report.spread([])


def test_every_required_key_present_nested():
    built = report.build(*full_inputs())
    assert built["missing"] == [] and built["errors"] == {}
    assert built["boot"]["ready_s"] == {"median": 3.0, "min": 1.0, "max": 10.0, "n": 4}
    assert set(built["sandboxer"]["pss_kb"]) == {"1", "5", "10"}
    assert built["io"]["stdout_integrity"] is True
    assert built["image"]["initrd_bytes"] == 9_000_000
    assert built["machine"]["cores"] == 2
    for key in report.REQUIRED_KEYS:
        assert report.get_path(built, key) is not None, key


def test_failed_benchmark_leaves_its_keys_missing_and_named():
    samples, exact, machine = full_inputs()
    samples = {k: v for k, v in samples.items() if not k.startswith("rpc.")}
    samples["guest.mem_used_kb"] = []
    built = report.build(samples, exact, machine, {"rpc": "VmError: agent did not start"})
    assert built["missing"] == ["guest.mem_used_kb", "rpc.check_p50_ms", "rpc.check_p99_ms"]
    table = report.markdown(built)
    assert "| `rpc.check_p50_ms` | missing |" in table
    assert "- rpc: VmError: agent did not start" in table


def test_markdown_rows_units_and_anchors():
    table = report.markdown(report.build(*full_inputs()))
    assert "| `boot.ready_s` | 3 | 1 | 10 | 4 | s |" in table
    assert "| `sandboxer.pss_kb.10` | 2 | 1 | 3 | 3 | kB |" in table
    assert "| `io.stdout_mb_s` | 2 | 1 | 3 | 3 | MB/s |" in table
    assert "| `io.stdout_integrity` | true |" in table
    assert "| `pod.start_s_parallel_5` | 2 | 1 | 3 | 3 | s |" in table
    assert "| `image.kernel_bytes` | 5000000 |" in table
    assert "load average at start [6.5, 6.0, 5.0]" in table
    assert "`agent.*`: Pss_Anon and Pss from /proc/1/smaps_rollup read by ExecVMProcess." in table
    for what, figure, source in report.ANCHORS:
        assert f"| {what} | {figure} | {source} |" in table
    assert sum(line.startswith("| `") for line in table.splitlines()) == len(report.REQUIRED_KEYS)


def test_every_required_key_comes_from_exactly_one_group():
    from bench.run import GROUPS, failed_keys

    for key in report.REQUIRED_KEYS:
        assert [g for g in GROUPS if failed_keys([key], [g])] != [], key
        assert len([g for g in GROUPS if failed_keys([key], [g])]) == 1, key


def test_a_partial_run_fails_only_on_the_keys_of_the_groups_it_ran():
    """`bench.run --only pods` leaves the sandboxer group's pod.start_s_single missing: not a
    failure of the run (it exited 1 for it)."""
    from bench.run import failed_keys

    missing = ["pod.start_s_single", "pod.start_s_parallel_5", "boot.ratio", "pod.template.start_s_single"]
    assert failed_keys(missing, ["pods"]) == ["pod.template.start_s_single"]
    assert failed_keys(missing, ["sandboxer", "boot"]) == ["pod.start_s_single", "pod.start_s_parallel_5", "boot.ratio"]
    assert failed_keys(missing[:3], ["pods", "image"]) == []
