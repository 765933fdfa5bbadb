import subprocess
import sys
import tomllib

import pytest

from kvd.core.config import Settings, default_config_text, load_settings
from kvd.core.errors import ConfigError


def test_default_file_lists_every_setting_with_its_default():
    doc = tomllib.loads(default_config_text())
    defaults = Settings().model_dump(mode="json")
    assert doc == defaults


def test_config_kvd_toml_is_the_default_file():
    from pathlib import Path

    assert (Path(__file__).parents[2] / "config" / "kvd.toml").read_text() == default_config_text()


def test_file_env_and_overrides_layer_in_order(tmp_path):
    p = tmp_path / "kvd.toml"
    p.write_text('[host]\ncapacity_bytes = "2GiB"\nslot_bytes = 131072\n[keys]\nchunk_tokens = 128\n')
    s = load_settings(p, environ={"KVD_HOST__CAPACITY_BYTES": "3GiB", "KVD_POLICY__EVICTION": "arc"},
                      overrides={"daemon": {"socket": "/tmp/x.sock"}})
    assert s.host.capacity_bytes == 3 << 30 and s.host.slot_bytes == 131072
    assert s.keys.chunk_tokens == 128 and s.policy.eviction == "arc"
    assert str(s.socket_path()) == "/tmp/x.sock"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KVD_HOST__CAPACITY": "1"}, "host.capacity: unknown setting.*allowed here: capacity_bytes"),
        ({"KVD_POLICY__EVICTION": "fifo"}, r"policy.eviction = 'fifo' \(from environment variable "
                                           r"KVD_POLICY__EVICTION\).*'lru', 'arc' or 'cost_aware'"),
        ({"KVD_HOST__LOW_WATERMARK": "0.95"}, "low_watermark=0.95 is above high_watermark"),
        ({"KVD_DAEMON__METRICS_ADDR": "nowhere"}, "metrics_addr.*HOST:PORT"),
        ({"KVD_DAEMON__SOCKET_MODE": "rw"}, "octal"),
        ({"KVD_BOGUS__X": "1"}, "bogus: unknown setting"),
    ],
)
def test_bad_settings_name_key_value_and_what_is_allowed(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ=env)


def test_bad_file_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[host\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_a_config_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    """A file saved as Latin-1 or UTF-16 stopped ``kvd --config`` and ``--check-config`` with a
    UnicodeDecodeError traceback."""
    p = tmp_path / "latin1.toml"
    p.write_bytes('[daemon]\n# caf\u00e9\nlog_level = "INFO"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml is not UTF-8 text \(byte 14"):
        load_settings(p, environ={})
    r = subprocess.run([sys.executable, "-m", "kvd.daemon.service", "--check-config", str(p)],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_cli_check_and_print(tmp_path):
    kvd = [sys.executable, "-m", "kvd.daemon.service"]
    out = subprocess.run([*kvd, "--print-default-config"], capture_output=True, text=True, check=True).stdout
    assert out == default_config_text()
    good = tmp_path / "good.toml"
    good.write_text(out)
    r = subprocess.run([*kvd, "--check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[host]\ncapacity_bytes = -5\n")
    r = subprocess.run([*kvd, "--check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "host.capacity_bytes = -5" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("env, message", [
    ({"KVD_SSD__CAPACITY_BYTES": "0"}, "capacity_bytes=0 is below 64 KiB; to run without the SSD tier"),
    ({"KVD_SSD__CAPACITY_BYTES": "1000"}, "capacity_bytes=1000 is below 64 KiB"),
    ({"KVD_SSD__MAP_SIZE_BYTES": "4096"}, "map_size_bytes=4096 is below LMDB's smallest usable map"),
])
def test_ssd_sizes_lmdb_cannot_use_name_the_setting(env, message):
    """capacity_bytes = 0 was accepted (nothing stored, every write-down failed) and a map under ~32 KiB
    stopped the start with "not a kvd SSD store: move it away", blaming an empty directory."""
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ=env)
    load_settings(None, environ={"KVD_SSD__ENABLED": "false", "KVD_SSD__CAPACITY_BYTES": "0"})  # off: any size
