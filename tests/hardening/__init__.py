"""Hardening tests: bounded stress against the real ``twistd streamrelay`` launch."""
