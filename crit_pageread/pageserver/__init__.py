"""Both ends of CRIU's page-server protocol: wire format, client, server, TLS."""
