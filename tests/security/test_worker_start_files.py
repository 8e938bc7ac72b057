"""`fencer worker` and `fencer api` with the shipped example settings (whose CA, certificate and
key do not exist on this machine): one line on stderr naming every setting and path, exit 1,
no traceback; `fencer config check` reports the same and warns about nothing Kafka-related
(SASL_SSL). Issue #15: before, the worker ended with a bare FileNotFoundError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fencing.signing import new_key_line

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fencer.example.yaml"
MISSING = (
    "kafka.ssl_cafile: /etc/fencer/kafka-ca.pem: no such file",
    "kafka.ssl_certfile: /etc/fencer/kafka-client.pem: no such file",
    "kafka.ssl_keyfile: /etc/fencer/kafka-client.key: no such file",
)


def _fencer(*args: str) -> subprocess.CompletedProcess[str]:
    # The example names a signing keys file that is not here either: give the key inline, so
    # the Kafka files are what the worker trips over.
    env = {**os.environ, "FENCER_SIGNING__KEYS": new_key_line("example")}
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [["worker", "-c"], ["worker", "--roles", "notify", "-c"]])
def test_the_worker_names_every_missing_kafka_file_in_one_line(command: list[str]) -> None:
    if any(Path(m.split(": ")[1]).exists() for m in MISSING):
        pytest.fail("this machine has the example's Kafka files: the test needs them absent")
    proc = _fencer(*command, str(EXAMPLE))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "fencer: " + "; ".join(MISSING), proc.stderr
    assert "Traceback" not in proc.stderr and "FileNotFoundError" not in proc.stderr


def test_config_check_names_them_too_and_skip_files_accepts_the_example() -> None:
    proc = _fencer("config", "check", str(EXAMPLE))
    assert proc.returncode == 1
    for m in MISSING:
        assert f"fencer: {m}\n" in proc.stderr
    assert "warning: kafka." not in proc.stderr  # SASL_SSL: no PLAINTEXT warning
    ok = _fencer("config", "check", "--skip-files", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
