"""Publisher and viewer tokens, and the ``streamrelay-token`` console script."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest

from streamrelay.roles import Role
from streamrelay.token_cli import main as token_main
from streamrelay.tokens import (
    TokenError,
    make_token,
    read_secret_file,
    secret_from_environment,
    verify_token,
)

SECRET = b"correct horse battery staple"
NOW = 1_700_000_000.0


def test_token_format_is_expiry_dot_hex_hmac() -> None:
    """``<expires>.<hex HMAC-SHA256(secret, "<role>:<stream>:<expires>")>`` exactly as
    docs/protocol.md says, so other languages can mint tokens."""
    token = make_token(SECRET, "publish", "cam", 1_700_003_600)
    expected = hmac.new(SECRET, b"publish:cam:1700003600", hashlib.sha256).hexdigest()
    assert token == f"1700003600.{expected}"


@pytest.mark.parametrize("role", ["publish", "view"])
def test_round_trip(role: str) -> None:
    """A token verifies for its role and stream before it expires."""
    token = make_token(SECRET, role, "cam", int(NOW) + 60)
    verify_token(SECRET, token, role, "cam", NOW)


def test_uppercase_hex_is_accepted() -> None:
    """Hex case does not matter."""
    expires, _, signature = make_token(SECRET, "view", "cam", int(NOW) + 60).partition(".")
    verify_token(SECRET, f"{expires}.{signature.upper()}", "view", "cam", NOW)


def test_tampered_signature_is_refused() -> None:
    """Changing one hex digit of the signature invalidates the token."""
    token = make_token(SECRET, "publish", "cam", int(NOW) + 60)
    last = "0" if token[-1] != "0" else "1"
    with pytest.raises(TokenError, match="invalid"):
        verify_token(SECRET, token[:-1] + last, "publish", "cam", NOW)


def test_tampered_expiry_is_refused() -> None:
    """Extending the expiry breaks the signature."""
    expires, _, signature = make_token(SECRET, "publish", "cam", int(NOW) + 60).partition(".")
    with pytest.raises(TokenError, match="invalid"):
        verify_token(SECRET, f"{int(expires) + 86400}.{signature}", "publish", "cam", NOW)


def test_other_secret_is_refused() -> None:
    """A token signed with another secret is invalid."""
    token = make_token(b"another secret", "publish", "cam", int(NOW) + 60)
    with pytest.raises(TokenError, match="invalid"):
        verify_token(SECRET, token, "publish", "cam", NOW)


def test_wrong_role_is_refused() -> None:
    """A viewer token does not allow publishing, and the reverse."""
    view = make_token(SECRET, "view", "cam", int(NOW) + 60)
    publish = make_token(SECRET, "publish", "cam", int(NOW) + 60)
    with pytest.raises(TokenError):
        verify_token(SECRET, view, "publish", "cam", NOW)
    with pytest.raises(TokenError):
        verify_token(SECRET, publish, "view", "cam", NOW)


def test_wrong_stream_is_refused() -> None:
    """A token is bound to its stream name."""
    token = make_token(SECRET, "publish", "cam", int(NOW) + 60)
    with pytest.raises(TokenError):
        verify_token(SECRET, token, "publish", "cam2", NOW)


def test_expired_token_is_refused() -> None:
    """A token stops working at its expiry second."""
    token = make_token(SECRET, "view", "cam", int(NOW))
    verify_token(SECRET, token, "view", "cam", NOW - 1)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, "view", "cam", NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "abc",
        "1700000060",
        "1700000060.",
        ".deadbeef",
        "-5." + "0" * 64,
        "17e8." + "0" * 64,
        "1700000060." + "0" * 63,
        "1700000060." + "0" * 65,
        "1" * 13 + "." + "0" * 64,
        "1700000060.0x" + "0" * 62,
        "1700000060." + "é" * 64,
        "1700000060 ." + "0" * 64,
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """Anything but ``digits.64-hex`` is refused with TokenError, nothing else."""
    with pytest.raises(TokenError):
        verify_token(SECRET, token, "view", "cam", NOW)


@pytest.mark.parametrize("expires", ["\u00b2", "1\u00b3"])
def test_unicode_digit_expiry_is_malformed(expires: str) -> None:
    """Characters that are "digits" to Unicode but not to int() are a malformed token
    (TokenError), not a ValueError."""
    with pytest.raises(TokenError):
        verify_token(SECRET, f"{expires}." + "0" * 64, "view", "cam", NOW)


def test_error_messages_do_not_contain_the_token() -> None:
    """Refusal reasons are logged and sent: they never repeat the token."""
    token = make_token(SECRET, "publish", "cam", int(NOW) + 60)
    for bad, role, stream, now in [
        (token[:-1] + "x", "publish", "cam", NOW),
        (token, "publish", "cam", NOW + 3600),
        (token, "view", "cam", NOW),
    ]:
        with pytest.raises(TokenError) as caught:
            verify_token(SECRET, bad, role, stream, now)
        assert token.split(".")[1][:16] not in str(caught.value)


def test_make_token_rejects_unknown_role() -> None:
    """Only ``publish`` and ``view`` exist."""
    with pytest.raises(ValueError):
        make_token(SECRET, "admin", "cam", int(NOW))


def test_roles_are_the_enum_or_its_value() -> None:
    """``Role.PUBLISHER`` and ``"publish"`` sign the same token (the value is the role
    word of the documented format), and either verifies it; no token grants ``echo``."""
    by_member = make_token(SECRET, Role.PUBLISHER, "cam", int(NOW) + 60)
    assert by_member == make_token(SECRET, "publish", "cam", int(NOW) + 60)
    verify_token(SECRET, by_member, "publish", "cam", NOW)
    viewer = make_token(SECRET, "view", "cam", int(NOW) + 60)
    verify_token(SECRET, viewer, Role.VIEWER, "cam", NOW)
    for role in (Role.ECHO, "echo", "publisher", "viewer"):
        with pytest.raises(ValueError):
            make_token(SECRET, role, "cam", int(NOW) + 60)


# -- secrets -------------------------------------------------------------------------------


def test_secret_file_is_stripped(tmp_path: Path) -> None:
    """Surrounding whitespace (an editor's final newline) is not part of the secret."""
    path = tmp_path / "secret"
    path.write_bytes(b"  s3cret\n")
    assert read_secret_file(str(path)) == b"s3cret"


def test_empty_secret_file_is_refused(tmp_path: Path) -> None:
    """An empty secret would make every token forgeable."""
    path = tmp_path / "secret"
    path.write_bytes(b" \n")
    with pytest.raises(ValueError, match="empty"):
        read_secret_file(str(path))


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or blank means no secret."""
    monkeypatch.delenv("SR_TEST_SECRET", raising=False)
    assert secret_from_environment("SR_TEST_SECRET") is None
    monkeypatch.setenv("SR_TEST_SECRET", "   ")
    assert secret_from_environment("SR_TEST_SECRET") is None
    monkeypatch.setenv("SR_TEST_SECRET", " abc ")
    assert secret_from_environment("SR_TEST_SECRET") == b"abc"


# -- streamrelay-token ---------------------------------------------------------------------


def _printed_token(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    return out.strip()


def test_cli_prints_a_token_from_a_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``streamrelay-token publish NAME --ttl 3600 --secret-file PATH`` prints one token
    that verifies for that role and stream for about ``--ttl`` seconds."""
    monkeypatch.delenv("STREAMRELAY_PUBLISH_SECRET", raising=False)
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    before = time.time()
    assert token_main(["publish", "cam", "--ttl", "3600", "--secret-file", str(path)]) == 0
    token = _printed_token(capsys)
    verify_token(SECRET, token, "publish", "cam", time.time())
    expires = int(token.split(".")[0])
    assert before + 3599 <= expires <= time.time() + 3601
    with pytest.raises(TokenError):
        verify_token(SECRET, token, "view", "cam", time.time())


@pytest.mark.parametrize(
    ("role", "variable"),
    [("publish", "STREAMRELAY_PUBLISH_SECRET"), ("view", "STREAMRELAY_VIEW_SECRET")],
)
def test_cli_reads_the_secret_from_the_role_environment_variable(
    role: str, variable: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --secret-file the role's environment variable holds the secret."""
    monkeypatch.delenv("STREAMRELAY_PUBLISH_SECRET", raising=False)
    monkeypatch.delenv("STREAMRELAY_VIEW_SECRET", raising=False)
    monkeypatch.setenv(variable, SECRET.decode())
    assert token_main([role, "cam"]) == 0
    token = _printed_token(capsys)
    verify_token(SECRET, token, role, "cam", time.time() + 3500)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, role, "cam", time.time() + 3700)


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["publish", "bad/name"], "invalid stream name"),
        (["publish", "cam", "--ttl", "0"], "--ttl"),
        (["publish", "cam", "--ttl", "-5"], "--ttl"),
        (["admin", "cam"], "invalid choice"),
        (["publish", "cam"], "STREAMRELAY_PUBLISH_SECRET"),
        (["view", "cam", "--secret-file", "/nonexistent/secret"], "--secret-file"),
    ],
)
def test_cli_usage_errors(
    arguments: list[str],
    complaint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad arguments exit with status 2 and say what is wrong; nothing on stdout."""
    monkeypatch.delenv("STREAMRELAY_PUBLISH_SECRET", raising=False)
    monkeypatch.delenv("STREAMRELAY_VIEW_SECRET", raising=False)
    with pytest.raises(SystemExit) as exited:
        token_main(arguments)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert complaint in captured.err


def test_cli_refuses_an_empty_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty secret file is a usage error, not a token anyone could forge."""
    path = tmp_path / "empty"
    path.write_bytes(b"\n")
    with pytest.raises(SystemExit):
        token_main(["view", "cam", "--secret-file", str(path)])
    assert "empty" in capsys.readouterr().err
