"""Where the tests run: under CI, a suite whose tool is missing fails instead of
skipping (a CI run that silently skipped a suite would prove nothing)."""

from __future__ import annotations

import os


def ci_is_set() -> bool:
    """True when running under CI (env ``CI`` set to anything but empty/0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
