"""The command line as a user meets it: `ssiu` and `python -m ssiu`, help, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from ssiu import cli

COMMANDS = (
    "demo",
    "train",
    "upscale",
    "info",
    "eval",
    "export",
    "bench",
    "check-kernels",
    "profile",
)


def test_python_dash_m_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "ssiu", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in COMMANDS:
        assert command in out


# The console script installed beside this interpreter (the venv's bin/).
SCRIPT = Path(sys.executable).parent / "ssiu"


@pytest.mark.skipif(not SCRIPT.exists(), reason="ssiu is not installed as a console script")
def test_console_script_runs():
    out = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ssiu ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert "usage: ssiu" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SSIU_DEBUG", raising=False)
    missing = tmp_path / "nope.pt"
    assert cli.main(["info", "--weights", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssiu info: error:") and str(missing) in err
    assert "Traceback" not in err
    assert cli.main(["info", "--size", "12by9"]) == 1
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SSIU_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["info", "--weights", str(tmp_path / "nope.pt")])
