"""Python code generated from proto/ (scripts/genproto.py; not committed but this file)."""

# Kuasar's agent service (vmm/common/src/protos/sandbox.proto, package `grpc`) by its name on the
# wire: what host and guest both call it by (tests/unit/test_protos.py checks it against the
# generated descriptor). Here, not in the generated kuasar package, so a fresh checkout has it.
SANDBOX_SERVICE = "grpc.SandboxService"
