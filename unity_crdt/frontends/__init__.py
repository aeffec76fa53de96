"""What local front ends talk to: the y-websocket endpoint for JS apps, the control socket of
`unity-crdt run` with its client, and Prometheus metrics."""
