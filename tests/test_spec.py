"""Run spec validation: durations, remote directories, empty and over-long commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from winbuilder.errors import ExitCode, UsageError
from winbuilder.spec import RunSpec, check_remote_dir, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400),
                                               ("2.5h", 9000), ("1h2m3s", 3723)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "5d", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_duration(text)
    assert err.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("path", ["C:\\workspace", "D:\\a\\b c\\", "c:\\x"])
def test_good_remote_dirs(path: str) -> None:
    assert check_remote_dir(path)


@pytest.mark.parametrize("path", ["workspace", "C:/workspace", "C:\\a%PATH%", "C:\\a&b", "C:\\dir.", "\\\\srv\\x",
                                  "C:\\a\"b"])
def test_bad_remote_dirs(path: str) -> None:
    with pytest.raises(UsageError):
        check_remote_dir(path)


def test_empty_command_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty"):
        RunSpec(command="  ", workspace=tmp_path)


def test_over_long_cmd_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="8191"):
        RunSpec(command="echo " + "x" * 8200, workspace=tmp_path)
    RunSpec(command="echo " + "x" * 8200, workspace=tmp_path, shell="powershell")  # noqa: S604 - not a subprocess


@pytest.mark.parametrize("path", ["C:\\", "D:\\", "C:\\Windows", "c:\\windows\\temp\\x", "C:\\Users",
                                  "C:\\Users\\builder", "C:\\Program Files\\app", "C:\\ProgramData"])
def test_cleaning_refuses_roots_system_folders_and_profiles(tmp_path: Path, path: str) -> None:
    with pytest.raises(UsageError, match="--keep-remote"):
        RunSpec(command="ver", workspace=tmp_path, remote_dir=path)
    RunSpec(command="ver", workspace=tmp_path, remote_dir=path, clean_remote=False)
    RunSpec(command="ver", workspace=tmp_path, remote_dir=path, copy_in=False)


@pytest.mark.parametrize("path", ["C:\\workspace", "D:\\builds\\a", "C:\\Users\\builder\\ws"])
def test_cleaning_allows_folders_of_their_own(tmp_path: Path, path: str) -> None:
    assert RunSpec(command="ver", workspace=tmp_path, remote_dir=path).clean_remote
