"""Loopback integration tests against the real ``twistd streamrelay`` launch."""
