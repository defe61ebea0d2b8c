"""``streamrelay-token``: print a publisher, viewer or relay token."""

from __future__ import annotations

import argparse
import sys
import time

from streamrelay.names import is_valid_stream_name
from streamrelay.roles import Role
from streamrelay.tokens import ROLES, make_token, read_secret_file, secret_from_environment

_ENVIRONMENT = {
    Role.PUBLISHER: "STREAMRELAY_PUBLISH_SECRET",
    Role.VIEWER: "STREAMRELAY_VIEW_SECRET",
    Role.RELAY: "STREAMRELAY_RELAY_SECRET",
}


def main(argv: list[str] | None = None) -> int:
    """Print a token for ROLE on STREAM, valid for --ttl seconds."""
    parser = argparse.ArgumentParser(
        prog="streamrelay-token", description="Print a streamrelay token."
    )
    parser.add_argument(
        "role", choices=[role.value for role in ROLES], help="what the token allows"
    )
    parser.add_argument("stream", help="stream name")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds of validity (3600)")
    parser.add_argument(
        "--secret-file",
        help="file holding the secret (default: env STREAMRELAY_PUBLISH_SECRET, "
        "STREAMRELAY_VIEW_SECRET or STREAMRELAY_RELAY_SECRET, by role)",
    )
    arguments = parser.parse_args(argv)
    role = Role(arguments.role)
    if not is_valid_stream_name(arguments.stream):
        parser.error("invalid stream name")
    if arguments.ttl <= 0:
        parser.error("--ttl must be positive")
    if arguments.secret_file:
        try:
            secret = read_secret_file(arguments.secret_file)
        except (OSError, ValueError) as error:
            parser.error(f"--secret-file: {error}")
    else:
        found = secret_from_environment(_ENVIRONMENT[role])
        if found is None:
            parser.error(f"give --secret-file or set {_ENVIRONMENT[role]}")
        secret = found
    expires = int(time.time()) + arguments.ttl
    sys.stdout.write(make_token(secret, role, arguments.stream, expires) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
