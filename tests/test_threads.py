"""ssiu/threads.py: the CPU thread count of every command, and what `ssiu --help` imports."""

import subprocess
import sys

import pytest
import torch

from ssiu import cli, threads


def test_parse_threads():
    assert threads.parse_threads("auto") is None and threads.parse_threads(None) is None
    assert threads.parse_threads("3") == 3 and threads.parse_threads(2) == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="threads"):
            threads.parse_threads(bad)


def test_limited_threads_restores_the_count():
    before = torch.get_num_threads()
    with threads.limited_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError), threads.limited_threads(1):
        raise KeyError
    assert torch.get_num_threads() == before


def test_choice_order(monkeypatch):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    assert threads.choose_threads(3) == threads.ThreadChoice(3, "--threads")
    monkeypatch.setenv(threads.ENV_VAR, "2")
    assert threads.choose_threads("auto").reason == threads.ENV_VAR
    monkeypatch.delenv(threads.ENV_VAR)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads().reason == "OMP_NUM_THREADS"


def test_probe_picks_one_or_the_default(monkeypatch):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with threads.limited_threads(2):
        choice = threads.choose_threads()
        assert choice.threads in (1, 2) and torch.get_num_threads() == 2
    assert choice.line().startswith(f"CPU threads: {choice.threads} (")


def test_passive_waiting_is_the_default(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prefer_passive_waiting()
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    threads.prefer_passive_waiting()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_computing_commands_show_their_thread_count(tmp_path, capsys):
    missing = str(tmp_path / "nope.png")
    assert cli.main(["upscale", missing, missing, "--weights", "w", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "CPU threads: 1 (--threads)" in err
    assert cli.main(["train", "--threads", "0"]) == 1
    assert "threads must be" in capsys.readouterr().err


def test_help_imports_no_heavy_module():
    code = (
        "import sys, ssiu.cli\n"
        "try:\n    ssiu.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'triton', 'skimage', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_info_imports_no_triton():
    code = (
        "import sys, ssiu.cli\n"
        "ssiu.cli.main(['info'])\n"
        "heavy = [m for m in ('triton', 'skimage', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_package_loads_its_names_on_first_use():
    import ssiu

    assert callable(ssiu.train) and callable(ssiu.data.to_uint8)
    assert ssiu.training.TrainConfig is not None and "build" in dir(ssiu)
    with pytest.raises(AttributeError, match="no_such_name"):
        ssiu.no_such_name  # noqa: B018
