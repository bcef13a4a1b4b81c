import pytest
from click.testing import CliRunner

from cxr_ray.cli import main


def _commands():
    return sorted(main.commands)


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in _commands():
        assert name in result.output
    assert "CXR_" in result.output


@pytest.mark.parametrize("command", _commands())
def test_every_subcommand_has_useful_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    body = result.output.split("Options:")[0]
    # A real description, not just the usage line.
    assert len(body.strip().splitlines()) >= 3, result.output


def test_python_dash_m_entrypoint():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cxr_ray", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "cxr-ray" in out.stdout
