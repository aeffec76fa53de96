"""The crypto rules, sans-IO: group keys and sealed blobs, the Noise handshake, sealed frames."""
