"""The systemd unit: Type=notify and the hardening the issue names, parsed as an INI file."""

import configparser
from pathlib import Path

UNIT = Path(__file__).parents[2] / "config" / "kvd.service"


def test_unit_file_has_notify_directories_and_hardening():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    s = cp["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["RuntimeDirectory"] == "kvd" and s["StateDirectory"] == "kvd"
    assert s["ProtectSystem"] == "strict" and s["PrivateTmp"] == "true" and s["NoNewPrivileges"] == "true"
    assert "WatchdogSec" in s and "kill -HUP" in s["ExecReload"]
    assert s["ExecStart"].split()[1:] == ["--config", "/etc/kvd/kvd.toml"]
