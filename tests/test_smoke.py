"""The package imports and the CLI answers; detailed behaviour lives in the per-package tests."""

import subprocess
import sys


def test_cli_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("broker", "config", "events", "worker", "demo", "ipmi", "api"):
        assert command in out
