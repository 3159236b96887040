"""`vmm-task` command line in dev mode (PID 1 ignores argv: the kernel passes what it likes)."""

import pytest

from vmm_task.__main__ import UsageError, main, parse_args


def test_options_with_space_or_equals():
    options = parse_args(["--listen", "unix:///tmp/a.sock", "--run-dir=/tmp/r", "--debug",
                          "--manage-network", "--runtime", "runc", "--log-level=debug",
                          "--pod-pause=/opt/pod-pause"])
    assert options == {"listen": "unix:///tmp/a.sock", "run-dir": "/tmp/r", "debug": True,
                       "manage-network": True, "runtime": "runc", "log-level": "debug",
                       "pod-pause": "/opt/pod-pause"}


@pytest.mark.parametrize("args, problem", [
    (["--listen"], "--listen needs a value"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments(args, problem):
    with pytest.raises(UsageError, match=problem):
        parse_args(args)


@pytest.mark.parametrize("args, code, said", [
    ([], 2, "not PID 1, so --listen is required"),
    (["--listen", "vsock://5000"], 2, "--run-dir is required"),
    (["--listen", "tcp://x"], 1, "unsupported listen address"),  # fails before any side effect
    (["--nope"], 2, "unknown argument"),
    (["--help"], 0, "usage: vmm-task"),
    (["--version"], 0, "vmm-task 0."),
])
def test_exit_codes_and_messages(args, code, said, capsys, tmp_path):
    if args[:1] == ["--listen"] and args[1].startswith("tcp"):
        args = args + ["--run-dir", str(tmp_path)]
    assert main(args) == code
    out, err = capsys.readouterr()
    assert said in out + err
