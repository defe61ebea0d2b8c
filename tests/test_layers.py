"""Imports run one way (issue 7): the core and the protocols never load the web layer,
and the relay (its client and its pulls included) never loads the publisher package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(module: str) -> list[str]:
    """The modules a fresh interpreter holds after importing ``module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return list(json.loads(output))


@pytest.mark.parametrize("module", ["streamrelay.protocol", "streamrelay.edge_protocol"])
def test_the_protocols_do_not_load_the_web_layer(module: str) -> None:
    """No twisted.web.server and none of the relay's web modules under a protocol."""
    loaded = loaded_after(module)
    assert "twisted.web.server" not in loaded
    assert not {"streamrelay.addresses", "streamrelay.web", "streamrelay.admission"} & set(loaded)


@pytest.mark.parametrize(
    "module", ["streamrelay.client", "streamrelay.upstream", "streamrelay.tap"]
)
def test_the_relay_does_not_load_the_publisher(module: str) -> None:
    """The relay's client and pulls use streamrelay.wsclient, not the publisher."""
    assert not [name for name in loaded_after(module) if name.startswith("streamrelay.publisher")]
