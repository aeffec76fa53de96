"""Links to peers: the channel and transport contracts with transports chosen by URL scheme,
the websocket transport, the per-link driver, the mesh policy and mDNS discovery."""
