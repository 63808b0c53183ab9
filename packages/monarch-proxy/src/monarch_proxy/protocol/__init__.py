"""The monarch-proxy wire protocol, without I/O: frames and the two session state machines."""
