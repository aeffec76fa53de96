"""Collective work: tasks spread across the group's nodes, leases with fencing tokens.

`rules` holds the decisions (sans-IO); `board` keeps the group's CRDT docs of jobs, heartbeats
and leases as indexes; `engine` runs workers and claims tasks; `leases` acquires and keeps
leases; `_kv` is the strict backend on NATS JetStream key-value (the one module here that
imports nats). The node wires them (`unity_crdt.node._work`).
"""
