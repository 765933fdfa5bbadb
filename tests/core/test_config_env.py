"""Environment overrides (issue 16): errors name the variable, unknown KVD_* variables are refused,
sizes, ``:PORT`` addresses and octal modes in files and variables."""

import subprocess
import sys

import pytest

from kvd.core.config import load_settings
from kvd.core.config_env import OTHER_ENV
from kvd.core.errors import ConfigError


def test_a_variable_with_one_underscore_is_refused_with_the_setting_it_meant():
    """``KVD_HOST_CAPACITY_BYTES`` (one underscore) was silently ignored."""
    with pytest.raises(ConfigError, match="KVD_HOST_CAPACITY_BYTES is not a kvd setting: did you mean "
                                          "KVD_HOST__CAPACITY_BYTES"):
        load_settings(None, environ={"KVD_HOST_CAPACITY_BYTES": "2GiB"})
    with pytest.raises(ConfigError, match="KVD_FROBNICATE is not a kvd setting: settings are"):
        load_settings(None, environ={"KVD_FROBNICATE": "1"})


def test_variables_that_are_not_settings_are_allowed():
    s = load_settings(None, environ={name: "x" for name in OTHER_ENV} | {"KVDX": "1", "MY_KVD_THING": "1"})
    assert s.daemon.socket == ""


def test_a_section_wide_error_names_the_variable_not_the_file(tmp_path):
    """A watermark pair set from the environment was blamed on the config file."""
    f = tmp_path / "kvd.toml"
    f.write_text("[host]\nhigh_watermark = 0.8\n")
    with pytest.raises(ConfigError, match=r"from environment variable KVD_HOST__LOW_WATERMARK, .*kvd\.toml\)"):
        load_settings(f, environ={"KVD_HOST__LOW_WATERMARK": "0.85"})
    with pytest.raises(ConfigError, match=r"host.capacity_bytes = '1 bushel' \(from environment variable "
                                          r"KVD_HOST__CAPACITY_BYTES\).*not a size"):
        load_settings(f, environ={"KVD_HOST__CAPACITY_BYTES": "1 bushel"})


def test_sizes_addresses_and_modes_from_a_file_and_the_environment(tmp_path):
    f = tmp_path / "kvd.toml"
    f.write_text('[daemon]\nsocket_mode = 0o640\nmetrics_addr = ":9464"\n[host]\ncapacity_bytes = "2G"\n'
                 '[ssd]\ncapacity_bytes = "16GB"\n')
    s = load_settings(f, environ={})
    assert (s.daemon.socket_mode, s.daemon.metrics_addr) == ("0640", ":9464")
    assert (s.host.capacity_bytes, s.ssd.capacity_bytes) == (2 << 30, 16 * 10**9)
    s = load_settings(f, environ={"KVD_DAEMON__SOCKET_MODE": "0o600", "KVD_HOST__CAPACITY_BYTES": "16GiB"})
    assert (s.daemon.socket_mode, s.host.capacity_bytes) == ("0600", 16 << 30)


def test_daemon_refuses_a_misspelt_variable_at_start(tmp_path):
    env = {"KVD_HOST_CAPACITY_BYTES": "2GiB", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "kvd.daemon.service", "--check-config", "/dev/null"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "KVD_HOST__CAPACITY_BYTES" in r.stderr and "Traceback" not in r.stderr


def test_list_settings_can_be_set_from_the_environment():
    """No value of KVD_REMOTE__STARTUP_NODES or KVD_ADMIN__UIDS was accepted ("Input should be a valid
    list"), so a list setting could not be overridden from the environment at all (Kubernetes, Docker)."""
    s = load_settings(None, environ={"KVD_REMOTE__STARTUP_NODES": "10.0.0.1:7000, 10.0.0.2:7000",
                                     "KVD_ADMIN__UIDS": "[0, 1001]", "KVD_ADMIN__GIDS": "2001"})
    assert s.remote.startup_nodes == ["10.0.0.1:7000", "10.0.0.2:7000"]
    assert (s.admin.uids, s.admin.gids) == ([0, 1001], [2001])
    s = load_settings(None, environ={"KVD_REMOTE__STARTUP_NODES": '["10.0.0.3:7000"]'})
    assert s.remote.startup_nodes == ["10.0.0.3:7000"]
    with pytest.raises(ConfigError, match=r"remote.startup_nodes = \['nohost'\] \(from environment variable "
                                          r"KVD_REMOTE__STARTUP_NODES\).*not HOST:PORT"):
        load_settings(None, environ={"KVD_REMOTE__STARTUP_NODES": "nohost"})
    with pytest.raises(ConfigError, match=r"admin.uids.1 = 'b' \(from environment variable KVD_ADMIN__UIDS\)"):
        load_settings(None, environ={"KVD_ADMIN__UIDS": "0,b"})
    with pytest.raises(ConfigError, match="KVD_ADMIN__UIDS: '\\[0,' is not a JSON array"):
        load_settings(None, environ={"KVD_ADMIN__UIDS": "[0,"})
