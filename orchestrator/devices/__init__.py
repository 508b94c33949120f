"""One device and how to talk to it: the `Device` record, the local and SSH transports, host keys, the registry, the agent bundle."""
