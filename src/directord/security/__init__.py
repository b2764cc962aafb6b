"""Security: the built-in PKI, TLS contexts and (later) ZeroMQ curve keys."""
