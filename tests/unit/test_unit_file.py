"""``directord unit-file``: the shipped units, pointing at the running installation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from directord.cli.main import main

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.mark.parametrize(
    ("unit", "file"),
    [
        ("client", "directord-client.service"),
        ("server", "directord-server.service"),
        ("server-socket", "directord-server.socket"),
        ("api-socket", "directord-api.socket"),
        ("proxy", "directord-proxy@.service"),
    ],
)
def test_unit_file_prints_the_shipped_unit_with_this_installations_directord(
    unit: str, file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["unit-file", unit]) == 0
    out = capsys.readouterr().out
    shipped = (CONTRIB / file).read_text()
    here = str(Path(sys.executable).parent / "directord")
    expected = shipped.replace("ExecStart=/usr/bin/directord", f"ExecStart={here}")
    assert out == expected.replace("ExecStop=/usr/bin/directord", f"ExecStop={here}")
    if file.endswith(".service"):
        assert f"ExecStart={here} " in out


def test_unit_file_refuses_an_unknown_unit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["unit-file", "nope"])
    assert info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
