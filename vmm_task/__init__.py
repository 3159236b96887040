"""vmm-task: the guest agent (PID 1 in the microVM; `vmm-task --listen unix:///PATH` on a host).

Imports here stay minimal: everything the agent loads at start costs boot time under emulation.
"""

__version__ = "0.1.0"
