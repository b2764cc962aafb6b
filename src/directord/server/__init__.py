"""The directord server: node registry, job queue and results, user API."""
