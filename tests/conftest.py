"""Shared fixtures. Each emulator's fixtures live in tests/fixtures/<name>.py and are loaded here."""

pytest_plugins = ["tests.fixtures.wsman", "tests.fixtures.sshd", "tests.fixtures.gce"]
