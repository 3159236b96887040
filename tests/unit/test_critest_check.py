"""critest_run's verdict: a spec passing on runc must pass on vmm unless docs/critest.md lists it
as impossible in a VM; the list is read from the doc itself, so doc and check cannot drift."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import critest_run  # noqa: E402


def test_a_spec_lost_on_vmm_is_a_regression_unless_documented():
    runc = {"kept": {"state": "passed"}, "lost": {"state": "passed"}, "listed": {"state": "passed"},
            "both fail": {"state": "failed"}, "not on vmm": {"state": "passed"}}
    vmm = {"kept": {"state": "passed"}, "lost": {"state": "failed"}, "listed": {"state": "failed"},
           "both fail": {"state": "failed"}}
    assert critest_run.regressions(runc, vmm, {"listed"}) == ["lost", "not on vmm"]


def test_the_documented_list_is_the_docs_own(tmp_path):
    doc = tmp_path / "critest.md"
    doc.write_text(f"# x\n\n{critest_run.EXCEPTIONS_HEADING}\n\n- `spec one`: why\n  more why\n"
                   "- `spec two`: why\n\n## Known differences\n\n- `not an exception`: later\n")
    assert critest_run.documented_exceptions(doc) == {"spec one", "spec two"}
    assert "[k8s.io] Security Context NamespaceOption runtime should support HostNetwork is true" \
        in critest_run.documented_exceptions()
