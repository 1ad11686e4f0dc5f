"""Daemon-side adapters: gRPC servicers, sockets, systemd notification."""
