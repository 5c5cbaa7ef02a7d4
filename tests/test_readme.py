"""The README's commands are real: every `dartsweep` line in its bash blocks parses as the CLI's, and the
README stays a user's page (the evidence lives in docs/)."""

import re
import shlex
from pathlib import Path

import pytest

from nas.cli import build_parser

README = Path(__file__).parent.parent / "README.md"


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [ln.split(" #")[0].strip() for block in blocks for ln in block.splitlines()]
    return [re.split(r"\s(\|\||>|&&)\s", ln)[0] for ln in lines if ln.startswith("dartsweep ")]


def test_readme_is_a_users_page():
    assert len(README.read_bytes()) <= 15 * 1024
    assert len(bash_commands()) >= 6


@pytest.mark.parametrize("command", bash_commands())
def test_readme_command_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)
