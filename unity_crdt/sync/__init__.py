"""The sync rules, sans-IO: lib0 varints, the Yjs guard, the wire codec, the replica, the
per-link session, the relay router and presence. Nothing here reads a clock or touches I/O."""
