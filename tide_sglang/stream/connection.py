"""Redis clients built from `TideSettings`: single server or Cluster, TLS, password from env or a secret file."""

import ssl
from urllib.parse import urlsplit

import redis
from redis._parsers.encoders import Encoder
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer

from tide_sglang.settings import TideSettings, redacted

__all__ = ["Client", "RedisUnavailable", "client_kwargs", "connect", "redacted"]

Client = redis.Redis | RedisCluster

_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)  # stateless: shared by connections


class RedisUnavailable(RuntimeError):
    """Redis cannot be used with these settings; the message says why and which setting to look at."""


def _password(settings: TideSettings) -> str | None:
    if settings.redis_password is not None:
        return settings.redis_password.get_secret_value()
    if settings.redis_password_file is not None:
        try:
            return settings.redis_password_file.read_text().strip()
        except OSError as e:
            raise RedisUnavailable(f"cannot read TIDE_REDIS_PASSWORD_FILE: {e}") from None
    return None


def client_kwargs(settings: TideSettings) -> dict[str, object]:
    """Keyword arguments for `Redis.from_url` / `RedisCluster.from_url` (pure; tested without a server)."""
    kwargs: dict[str, object] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        # Entries are ~1 MiB: the default 64 KiB read chunks halve a trainer's read throughput.
        "socket_read_size": 1 << 20,
        # hiredis' packer copies every argument into one buffer (~1.3 GB/s); redis-py's own packer hands large
        # values (our memoryview of the hidden states) to sendall untouched: 2-3x the XADD throughput.
        "command_packer": _PACKER,
    }
    password = _password(settings)
    if password is not None:
        kwargs["password"] = password
    if settings.redis_url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED if settings.redis_tls_verify else ssl.CERT_NONE
        kwargs["ssl_check_hostname"] = settings.redis_tls_verify
        for key, path in (
            ("ssl_ca_certs", settings.redis_tls_ca_file),
            ("ssl_certfile", settings.redis_tls_cert_file),
            ("ssl_keyfile", settings.redis_tls_key_file),
        ):
            if path is not None:
                kwargs[key] = str(path)
    elif any((settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file)):
        raise RedisUnavailable("TLS files are set but TIDE_REDIS_URL is not rediss://; use rediss:// for TLS")
    return kwargs


def connect(settings: TideSettings, *, check: bool = True) -> Client:
    """A client for the configured Redis; with `check`, ping it and turn failures into `RedisUnavailable`."""
    kwargs = client_kwargs(settings)
    try:
        if settings.redis_cluster:
            client: Client = RedisCluster.from_url(settings.redis_url, **kwargs)
        else:
            client = redis.Redis.from_url(settings.redis_url, **kwargs)
        if check:
            client.ping()
    except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError) as e:
        has_password = "password" in kwargs or urlsplit(settings.redis_url).password is not None
        what = "rejected the credentials" if has_password else "requires a password"
        raise RedisUnavailable(
            f"Redis at {redacted(settings.redis_url)} {what} ({e}); "
            "set TIDE_REDIS_PASSWORD or TIDE_REDIS_PASSWORD_FILE"
        ) from None
    except redis.ResponseError as e:
        raise RedisUnavailable(f"Redis at {redacted(settings.redis_url)} refused the connection: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.RedisClusterException, OSError) as e:
        raise RedisUnavailable(f"cannot reach Redis at {redacted(settings.redis_url)}: {e}") from None
    return client
