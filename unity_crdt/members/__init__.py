"""Membership: the signed roster (a CRDT of who may sync), invitations, epochs. Sans-IO.

`members.ops` encodes and signs roster ops, `members.roster` holds the op set and the rules
every member applies to it, `members.invites` reads and writes invite codes. The node wires
them to links, the relay and checkpoints (`node._members`).
"""
