"""API keys are stored only as hashes and refused once expired or revoked; configuration layers."""

from __future__ import annotations

import time

import pytest

from bastion.db import Database, DatabaseSettingError
from bastion.server.config import ConfigError, ServerConfig
from bastion.server.keys import KeyStore


@pytest.fixture
def keys(database_url):
    db = Database(database_url)
    yield KeyStore(db, cache_seconds=0)
    db.close()


def test_a_created_key_verifies_with_its_scopes(keys):
    key, record = keys.create("ci", ["decide", "facts:read"], created_by="test")
    found = keys.verify(key)
    assert found is not None and found.id == record.id
    assert found.allows("decide") and not found.allows("facts:write")


def test_the_store_holds_only_a_hash_of_the_key(keys):
    key, record = keys.create("ci", ["admin"], created_by="test")
    rows = keys.db.execute("SELECT * FROM api_keys")
    # The secret is token_urlsafe, which may itself hold "_": it is all after "bst_<id>_".
    secret = key.split("_", 2)[2]
    assert len(secret) >= 40
    assert key not in repr(rows)
    assert secret not in repr(rows)


def test_a_wrong_secret_with_a_real_id_is_refused(keys):
    key, _ = keys.create("ci", ["admin"], created_by="test")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert keys.verify(forged) is None
    assert keys.verify("bst_nothere_x") is None
    assert keys.verify("") is None


def test_a_revoked_key_is_refused_at_once(keys):
    key, record = keys.create("ci", ["admin"], created_by="test")
    assert keys.revoke(record.id, actor="test")
    assert keys.verify(key) is None
    assert not keys.revoke(record.id, actor="test")


def test_an_expired_key_is_refused(keys):
    key, _ = keys.create("short", ["decide"], expires_in=0.01, created_by="test")
    time.sleep(0.05)
    assert keys.verify(key) is None


def test_unknown_scopes_are_refused_with_the_list_of_known_ones(keys):
    with pytest.raises(ValueError, match="facts:write"):
        keys.create("x", ["facts:rw"], created_by="test")
    with pytest.raises(ValueError):
        keys.create("x", [], created_by="test")


def test_the_environment_admin_key_must_be_long_and_grants_admin(database_url):
    db = Database(database_url)
    with pytest.raises(ValueError, match="32"):
        KeyStore(db, env_admin_key="secret")
    strong = "k" * 40
    store = KeyStore(db, env_admin_key=strong)
    assert store.verify(strong).allows("policy:write")
    assert store.verify("k" * 39) is None
    db.close()


def test_config_defaults_file_and_environment_layer(tmp_path):
    defaults = ServerConfig.load(None, env={"BASTION_CONFIG": str(tmp_path / "absent.toml")})
    assert (defaults.host, defaults.port, defaults.admin_key) == ("127.0.0.1", 8000, "")
    file = tmp_path / "bastion.toml"
    file.write_text(
        '[server]\nport = 9001\ndatabase = "x.db"\n[oauth]\nissuer = "http://127.0.0.1"\n'
    )
    config = ServerConfig.load(file, env={"BASTION_PORT": "9002"})
    assert (config.host, config.port, config.database) == ("127.0.0.1", 9002, "x.db")
    assert config.oauth == {"issuer": "http://127.0.0.1"}


def test_config_refuses_unknown_keys_and_bad_types(tmp_path):
    file = tmp_path / "bastion.toml"
    file.write_text("[server]\nprot = 9001\n")
    with pytest.raises(ConfigError, match="prot"):
        ServerConfig.load(file, env={})
    with pytest.raises(ConfigError, match="port"):
        ServerConfig.load(
            None, env={"BASTION_PORT": "eighty", "BASTION_CONFIG": str(tmp_path / "x")}
        )
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig.load(tmp_path / "missing.toml", env={})


def test_config_refuses_a_fraction_for_a_whole_number(tmp_path):
    file = tmp_path / "bastion.toml"
    file.write_text("[server]\ndecision_records_buffer = 1.5\n")
    with pytest.raises(
        ConfigError, match="decision_records_buffer must be a whole number, got 1.5"
    ):
        ServerConfig.load(file, env={})


def test_config_refuses_a_signals_table_no_part_reads(tmp_path):
    file = tmp_path / "bastion.toml"
    file.write_text("[signals.postures]\nzones = {}\n")  # a misspelt [signals.posture]
    with pytest.raises(ConfigError, match=r"\[signals.postures\].*\[signals.posture\]"):
        ServerConfig.load(file, env={})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BASTION_MAX_STALENESS_SECONDS", "0"),
        ("BASTION_MAX_STALENESS_SECONDS", "inf"),
        ("BASTION_MAX_STALENESS_SECONDS", "nan"),
        ("BASTION_AUDIT_RETENTION_DAYS", "-1"),
        ("BASTION_DECISION_RECORDS_BUFFER", "0"),
        ("BASTION_DECISION_LOG_SIZE", "-1"),
    ],
)
def test_config_refuses_storage_limits_out_of_range(tmp_path, variable, value):
    env = {variable: value, "BASTION_CONFIG": str(tmp_path / "absent.toml")}
    with pytest.raises(ConfigError, match=variable.removeprefix("BASTION_").lower()):
        ServerConfig.load(None, env=env)


@pytest.mark.parametrize(
    "database", ["", "sqlite:///", "sqlite://", ":memory:", "sqlite:///:memory:"]
)
def test_a_database_setting_that_names_no_file_is_refused_not_run_on_a_throwaway_one(
    tmp_path, database
):
    """SQLite opens an empty path or :memory: as a temporary database: a server run on it
    would lose every key, fact and grant when it stops."""
    file = tmp_path / "bastion.toml"
    file.write_text(f"[server]\ndatabase = {database!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match="database: .*names no file"):
        ServerConfig.load(file, env={})
    with pytest.raises(DatabaseSettingError, match="names no file"):
        Database(database)


def test_an_empty_environment_variable_is_refused_naming_it_not_read_as_unset(tmp_path):
    absent = str(tmp_path / "absent.toml")
    for variable in ("BASTION_DATABASE", "BASTION_PORT", "BASTION_CONFIG"):
        env = {"BASTION_CONFIG": absent, variable: ""}
        with pytest.raises(ConfigError, match=f"{variable} is set but empty"):
            ServerConfig.load(None, env=env)


def test_a_database_of_another_product_or_a_directory_is_refused_by_name(tmp_path):
    with pytest.raises(DatabaseSettingError, match="not mysql://"):
        Database("mysql://x/y")
    with pytest.raises(DatabaseSettingError, match="is a directory"):
        Database(str(tmp_path))
    with pytest.raises(DatabaseSettingError, match="directory does not exist"):
        Database(str(tmp_path / "absent" / "bastion.db"))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def remembering(database_url):
    db = Database(database_url)
    yield KeyStore(db, cache_seconds=60)
    db.close()


def test_a_remembered_key_answers_for_that_exact_key_only(remembering):
    keys = remembering
    key, record = keys.create("ci", ["decide"], created_by="test")
    assert keys.remembered(key) == (False, None)
    assert keys.verify(key).id == record.id
    known, found = keys.remembered(key)
    assert known and found is not None and found.id == record.id
    forged = key[:-1] + ("A" if not key.endswith("A") else "B")
    for other in (forged, key + " ", key.upper(), key[:-1]):
        assert keys.remembered(other) == (False, None)
    # A refused key is remembered as refused, never as the key it resembles.
    assert keys.verify(forged) is None
    assert keys.remembered(forged) == (True, None)


def test_a_revocation_forgets_every_remembered_key_at_once(remembering):
    keys = remembering
    key, record = keys.create("ci", ["decide"], created_by="test")
    other, _ = keys.create("other", ["decide"], created_by="test")
    assert keys.verify(key) is not None and keys.verify(other) is not None
    assert keys.revoke(record.id, actor="test")
    assert keys.remembered(key) == (False, None)
    assert keys.remembered(other) == (False, None)
    assert keys.verify(key) is None
    assert keys.verify(other) is not None


def test_remembered_keys_are_bounded_in_characters_as_well_as_in_number(remembering):
    """Refused keys are remembered too: long ones must not grow the cache past its bound."""
    from bastion.server.keys import _REMEMBERED_CHARS

    keys = remembering
    long_key = "x" * 8192
    for i in range(2 * _REMEMBERED_CHARS // len(long_key)):
        assert keys.verify(f"{i}{long_key}") is None
        held = sum(len(k) for k in keys._cache)
        assert held <= _REMEMBERED_CHARS + len(long_key) + 8


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poll_interval", "0"),  # a replica polling without pause: a core at 99 %
        ("poll_interval", "-1"),
        ("poll_interval", "nan"),  # killed the change-log follower
        ("consistency_timeout", "-1"),
        ("consistency_timeout", "inf"),
        ("consistency_timeout", "nan"),
        ("header_timeout", "inf"),  # no slowloris defence
        ("body_timeout", "inf"),
        ("keep_alive_timeout", "inf"),
        ("linger_timeout", "-1"),
        ("linger_timeout", "inf"),  # a refused client held for ever
        ("fact_snapshot_interval", "inf"),
        ("fact_expired_grace_seconds", "-1"),  # a fact's row deleted before it expired
        ("fact_expired_grace_seconds", "inf"),
        ("audit_retention_days", "inf"),
        ("audit_checkpoint_seconds", "0"),  # a checkpoint line without pause
        ("audit_checkpoint_seconds", "inf"),
    ],
)
def test_a_time_that_is_not_a_finite_positive_number_of_seconds_is_refused(tmp_path, key, value):
    variable = f"BASTION_{key.upper()}"
    env = {variable: value, "BASTION_CONFIG": str(tmp_path / "absent.toml")}
    with pytest.raises(ConfigError, match=f"^{variable}: {key} must be"):
        ServerConfig.load(None, env=env)
    file = tmp_path / "bastion.toml"
    file.write_text(f"[server]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"{key} must be"):
        ServerConfig.load(file, env={})


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_a_port_outside_0_to_65535_is_refused_before_anything_is_opened(tmp_path, port, capsys):
    from bastion.cli import main

    file = tmp_path / "bastion.toml"
    file.write_text(f'[server]\nport = {port}\ndatabase = "{tmp_path / "b.db"}"\n')
    with pytest.raises(
        ConfigError, match="bastion.toml \\[server\\]: port must be from 0 to 65535"
    ):
        ServerConfig.load(file, env={})
    with pytest.raises(ConfigError, match="^BASTION_PORT: port must be from 0 to 65535"):
        ServerConfig.load(None, env={"BASTION_PORT": port, "BASTION_CONFIG": str(file) + ".x"})
    assert main(["serve", "--config", str(file)]) == 2
    assert "port must be from 0 to 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--port", port, "--database", str(tmp_path / "b.db")])
    assert "give a whole number from 0 to 65535" in capsys.readouterr().err
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[serverr]\nport = 9001\n", "unknown table [serverr]"),
        ("port = 1\n[server]\n", "unknown key 'port'"),
        ('[gatway]\n[[gatway.upstreams]]\nname = "x"\n', "unknown table [gatway]"),
    ],
)
def test_a_table_or_key_outside_the_known_tables_is_refused_naming_the_file(tmp_path, text, names):
    """A misspelt [gateway] ran the server without a gateway, and a top-level port was
    ignored: the file holds only the tables bastion reads."""
    file = tmp_path / "deploy.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as refused:
        ServerConfig.load(file, env={})
    assert str(refused.value).startswith(f"{file}: {names}"), refused.value


def test_a_message_names_where_the_value_came_from(tmp_path, capsys):
    from bastion.cli import main

    absent = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="^BASTION_PORT: port must be a whole number"):
        ServerConfig.load(None, env={"BASTION_PORT": "eighty", "BASTION_CONFIG": absent})
    with pytest.raises(ConfigError, match="^BASTION_LOG_LEVEL: log_level must be one of debug"):
        ServerConfig.load(None, env={"BASTION_LOG_LEVEL": "verbose", "BASTION_CONFIG": absent})
    file = tmp_path / "deploy.toml"
    file.write_text('[server]\nlog_level = "loud"\n')
    with pytest.raises(ConfigError, match=f"^{file} \\[server\\]: log_level must be one of"):
        ServerConfig.load(file, env={})
    file.write_text(f'[server]\ndatabase = "{tmp_path / "b.db"}"\n')
    assert main(["signals", "streams", "status", "--config", str(file)]) == 2
    assert (
        capsys.readouterr().err
        == f"bastion: {file} has no [signals.ssf] table: no transmitters to show\n"
    )


BASE = """
[server]
database = "{db}"
[oauth]
issuer = "http://127.0.0.1:8000"
key_dir = "{keys}"
[[oauth.resources]]
uri = "http://127.0.0.1:8000/mcp/desk"
scopes = ["customers:read"]
[gateway]
[[gateway.upstreams]]
name = "desk"
command = "true"
[approvals]
[tasks]
[signals.behavior]
[signals.posture]
[signals.api]
[signals.alerts]
"""


@pytest.mark.parametrize(
    "table",
    [
        "oauth",
        "gateway",
        "approvals",
        "tasks",
        "signals.behavior",
        "signals.posture",
        "signals.api",
        "signals.alerts",
    ],
)
def test_a_mistake_in_any_table_is_refused_naming_the_file_and_the_table(tmp_path, table):
    """Each table is read by the part of bastion it configures; whichever refuses a value, the
    message says which file and which table to fix."""
    from bastion.server.app import create_app

    file = tmp_path / "deploy.toml"
    text = BASE.format(db=tmp_path / "b.db", keys=tmp_path / "keys")
    file.write_text(text.replace(f"[{table}]\n", f"[{table}]\nbogus_setting = 1\n", 1))
    with pytest.raises(ConfigError) as refused:
        create_app(ServerConfig.load(file, env={}))
    assert str(refused.value).startswith(f"{file} [{table}]: "), refused.value
    assert "bogus_setting" in str(refused.value)
