"""tests/security: its helper module (sasl_gate) on sys.path."""

import sys
from pathlib import Path

# The suite runs with --import-mode=importlib, which puts no test directory on sys.path; the
# helper module is imported by name, as tests/notifiers does with notifier_peers.
sys.path.insert(0, str(Path(__file__).parent))
