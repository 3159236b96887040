"""Code shared by the guest agent and the host daemon: ttrpc and the generated protos.

Guest-safe: stdlib + protobuf only.
"""
