"""docs/operations.md cannot fall behind the code: its option table is the generated
one, and it names every metric the relay exports."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from streamrelay import options_doc
from streamrelay.tap import Options
from tests.fakes import Relay

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def test_the_option_table_is_the_generated_one() -> None:
    """The table in docs/operations.md is exactly what ``python -m
    streamrelay.options_doc`` prints (run it with ``--write docs/operations.md``)."""
    text = DOCUMENT.read_text("utf-8")
    assert options_doc.in_document(text) == options_doc.table()


def test_the_table_has_every_option_with_its_default() -> None:
    """One row per option of ``twistd streamrelay`` (help and version aside), each
    with the default twistd shows."""
    options = Options()
    rows = {name.split()[0][2:]: default for name, default, _ in options_doc.rows()}
    expected = {name.rstrip("=") for name in options.longOpt} - {"help", "version"}
    assert set(rows) == expected
    for name, default in options.defaults.items():
        if isinstance(default, str):
            assert rows[name] == (default or "(empty)"), name


def test_rewrite_replaces_only_the_table(tmp_path: Path) -> None:
    """--write swaps the table between its markers and leaves the rest alone."""
    document = tmp_path / "doc.md"
    document.write_text(f"before\n{options_doc.BEGIN}\nstale\n{options_doc.END}\nafter\n")
    assert options_doc.rewrite(document) is True
    text = document.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n")
    assert options_doc.in_document(text) == options_doc.table()
    assert options_doc.rewrite(document) is False


def test_every_exported_metric_is_documented() -> None:
    """Each metric family an idle relay exports is named in docs/operations.md."""
    response = Relay().connect().request("GET", "/metrics", {"Host": "relay.test"})
    names = {family.name for family in text_string_to_metric_families(response.body.decode())}
    text = DOCUMENT.read_text("utf-8")
    documented = set(re.findall(r"`(streamrelay_[a-z_]+?)(?:_total)?`", text))
    missing = {name for name in names if name.startswith("streamrelay_")} - documented
    assert missing == set()
    assert "`process_*`" in text
