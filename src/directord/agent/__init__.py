"""The node agent, started as ``directord client``: receive jobs, run them, report."""
