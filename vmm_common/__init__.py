"""Code shared by the guest agent and the host daemon: ttrpc, the generated protos, mount(2).

Guest-safe: stdlib + protobuf only.
"""
