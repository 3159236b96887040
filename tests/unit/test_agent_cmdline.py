"""The `task.*` kernel command line: Kuasar's names, bad values reported, boot never stopped."""

from vmm_task.init.cmdline import parse_cmdline, read_cmdline, split_cmdline


def test_split_like_the_kernel_with_double_quotes():
    assert split_cmdline('console=ttyS0  a="b c" "d e"=f\n') == ["console=ttyS0", "a=b c", "d e=f"]


def test_defaults_without_task_parameters():
    config = parse_cmdline("console=ttyS0 quiet")
    assert (config.sharefs_type, config.log_level, config.debug, config.cgroup, config.runtime) \
        == ("virtiofs", "info", False, "v2", "")
    assert config.problems == []


def test_kuasar_parameters():
    config = parse_cmdline("task.sharefs_type=9p task.log_level=DEBUG task.debug task.cgroup=v1 "
                           "task.runtime=runc")
    assert (config.sharefs_type, config.log_level, config.debug, config.cgroup, config.runtime) \
        == ("9p", "debug", True, "v1", "runc")


def test_kuasar_tracing_and_debug_shell():
    config = parse_cmdline("task.enable_tracing=true task.debug_shell=/bin/sh task.log_level=info")
    assert (config.enable_tracing, config.debug_shell, config.problems) == (True, "/bin/sh", [])
    assert "records no traces" in config.notes[0]
    config = parse_cmdline("task.enable_tracing=false task.debug_shell=sh")
    assert not config.enable_tracing and config.notes == [] and config.debug_shell == ""
    assert "task.debug_shell='sh'" in config.problems[0]


def test_preload_is_ours_and_off_by_default():
    assert not parse_cmdline("console=ttyS0").preload
    config = parse_cmdline("task.preload task.sharefs_type=virtiofs")
    assert config.preload and config.problems == [] and "preload" in repr(config)
    assert not parse_cmdline("task.preload=0").preload


def test_debug_boolean_forms():
    assert parse_cmdline("task.debug=1").debug and parse_cmdline("task.debug=true").debug
    assert not parse_cmdline("task.debug task.debug=off").debug


def test_bad_and_unknown_values_are_reported_and_defaults_kept():
    config = parse_cmdline("task.sharefs_type=nfs task.log_level=loud task.debug=maybe "
                           "task.frobnicate=1 task.cgroup=v3")
    assert (config.sharefs_type, config.log_level, config.debug, config.cgroup) \
        == ("virtiofs", "info", False, "v2")
    assert len(config.problems) == 5
    assert "task.sharefs_type='nfs'" in config.problems[0] and "virtiofs" in config.problems[0]
    assert any("unknown parameter task.frobnicate" in p for p in config.problems)


def test_words_after_double_dash_belong_to_init():
    assert not parse_cmdline("quiet -- task.debug").debug


def test_unreadable_cmdline_is_a_problem_not_a_crash(tmp_path):
    config = read_cmdline(str(tmp_path / "missing"))
    assert config.sharefs_type == "virtiofs"
    assert "cannot read" in config.problems[0]
