import ssl

import pytest
from pydantic import ValidationError

from tide_sglang import keys
from tide_sglang.settings import TideSettings
from tide_sglang.stream.connection import RedisUnavailable, client_kwargs, redacted


def test_env_is_read_with_prefix(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    monkeypatch.setenv("TIDE_REDIS_URL", "rediss://redis.tide.svc:6380/0")
    monkeypatch.setenv("TIDE_REDIS_TLS_CA_FILE", str(ca))
    monkeypatch.setenv("TIDE_REDIS_PASSWORD", "pw")
    monkeypatch.setenv("TIDE_DEPLOYMENT", "chat")
    s = TideSettings()
    kw = client_kwargs(s)
    assert kw["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kw["ssl_ca_certs"] == str(ca)
    assert kw["password"] == "pw" and s.deployment == "chat"
    assert "pw" not in repr(s)  # SecretStr


def test_tls_without_verification_is_explicit():
    kw = client_kwargs(TideSettings(redis_url="rediss://r:6380", redis_tls_verify=False))
    assert kw["ssl_cert_reqs"] == ssl.CERT_NONE and kw["ssl_check_hostname"] is False


def test_tls_files_on_plain_url_are_an_error(tmp_path):
    with pytest.raises(RedisUnavailable, match="use rediss://"):
        client_kwargs(TideSettings(redis_url="redis://r:6379", redis_tls_ca_file=tmp_path / "ca.pem"))


def test_password_file_missing_is_clear(tmp_path):
    with pytest.raises(RedisUnavailable, match="cannot read TIDE_REDIS_PASSWORD_FILE"):
        client_kwargs(TideSettings(redis_password_file=tmp_path / "nope"))


def test_bad_values_rejected():
    with pytest.raises(ValidationError, match="must start with redis://"):
        TideSettings(redis_url="http://localhost:6379")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TideSettings(redis_urll="redis://x")


def test_redacted_hides_password():
    assert redacted("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379") == "redis://host:6379"


def test_keys_are_hash_tagged_and_validated():
    assert keys.hidden_states("default", "chat") == "tide:{default/chat}:hs"
    assert keys.stats("team-a", "chat", 7) == "tide:{team-a/chat}:stats:7"
    assert keys.pods("team-a", "chat") == "tide:{team-a/chat}:pods"
    with pytest.raises(ValueError, match="invalid deployment name"):
        keys.control("default", "Bad_Name")
    with pytest.raises(ValueError, match="invalid namespace"):
        keys.control("team.a", "chat")  # a namespace is a DNS label: no dots
