"""The port-forward stream's request and answer lines (vmm_common.portforward) and the nftables
rule text the daemon installs in a pod's namespace."""
import pytest

from host_sandboxer.portforward import redirect
from vmm_common import portforward as protocol


@pytest.mark.parametrize("port", [1, 80, 65535])
def test_a_request_names_its_port(port):
    assert protocol.parse_request(protocol.request(port)) == port


@pytest.mark.parametrize("line", [b"PORT 0\n", b"PORT 65536\n", b"PORT 0080000\n", b"PORT 80",
                                  b"PORT -1\n", b"PORT  80\n", b"PORT 8O\n", b"port 80\n", b"",
                                  b"PORT \xd9\xa3\n"])  # an Arabic-Indic digit is not a port
def test_anything_else_is_a_protocol_error(line):
    with pytest.raises(protocol.ProtocolError, match="bad port-forward request"):
        protocol.parse_request(line)


def test_answers():
    protocol.check_answer(protocol.OK)
    with pytest.raises(ConnectionRefusedError, match="^port 81: 127.0.0.1: Connection refused$"):
        protocol.check_answer(protocol.refusal("port 81: 127.0.0.1:\nConnection refused"))
    long = protocol.refusal("x" * 1000)
    assert len(long) == protocol.MAX_LINE and long.endswith(b"\n")
    with pytest.raises(ConnectionRefusedError):
        protocol.check_answer(long)
    for broken in (b"", b"OK", b"YES\n", b"ERR " + b"x" * protocol.MAX_LINE + b"\n"):
        with pytest.raises(protocol.ProtocolError, match="bad port-forward answer"):
            protocol.check_answer(broken)


def test_the_rule_replaces_any_earlier_table_and_redirects_only_loopback_tcp():
    text = redirect.ruleset(40000)
    assert text.startswith(f"table ip {redirect.TABLE} {{}}\ndelete table ip {redirect.TABLE}\n")
    assert "type nat hook output priority -100;" in text
    assert "ip daddr 127.0.0.1 meta l4proto tcp redirect to :40000" in text
