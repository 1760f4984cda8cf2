"""Which Redis lorafleet talks to, as a redis-py client for job state and a URL for Celery.

``LORAFLEET_BROKER_URL`` (redis://, rediss:// or unix://) names a shared Redis; without it
the embedded Redis under the home folder is started or reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from lorafleet.common.errors import ConfigError, TransientError
from lorafleet.common.settings import Settings

_SCHEMES = ("redis", "rediss", "unix")

CLIENT_OPTIONS = {
    "socket_connect_timeout": 5,
    "socket_timeout": 15,
    "socket_keepalive": True,
    "health_check_interval": 15,
}
"""Every Redis connection lorafleet opens: a connect or a reply that takes longer fails (a
stalled Redis or a dead route is an error, not a hang); idle connections are kept alive and
checked before use. Celery's connections get the same through its transport options."""


@dataclass(frozen=True)
class Broker:
    """One Redis, addressed two ways: ``url`` for redis-py, ``celery_url`` for kombu."""

    url: str
    embedded: bool = False

    @property
    def celery_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            query = f"?{parts.query}" if parts.query else ""
            return f"redis+socket://{parts.path}{query}"
        return self.url

    def client(self, **options) -> redis.Redis:
        """A redis-py client that never hangs on a stalled Redis (CLIENT_OPTIONS)."""
        defaults = dict(CLIENT_OPTIONS)
        if urlsplit(self.url).scheme == "unix":
            defaults.pop("socket_keepalive")  # a TCP option
        return redis.Redis.from_url(self.url, **(defaults | options))

    def check(self, client: redis.Redis) -> None:
        """Ping once, turning a refusal into an error that says what to fix (password hidden)."""
        try:
            client.ping()
        except redis.AuthenticationError as exc:
            raise ConfigError(
                f"the broker {self.describe()} refused lorafleet's credentials ({exc}); "
                "check the user and password in LORAFLEET_BROKER_URL"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise TransientError(f"cannot reach the broker {self.describe()}: {exc}") from None

    def describe(self) -> str:
        """The URL with any password hidden, for logs and screens."""
        parts = urlsplit(self.url)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname}"
            if parts.port:
                netloc += f":{parts.port}"
            return parts._replace(netloc=netloc).geturl()
        return self.url


def resolve_broker(settings: Settings) -> Broker:
    """The configured Redis, or the embedded one (started if it is not running)."""
    if settings.broker_url:
        scheme = urlsplit(settings.broker_url).scheme
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"LORAFLEET_BROKER_URL has scheme {scheme!r}; allowed: redis://, rediss://, unix://"
            )
        return Broker(settings.broker_url)
    return Broker(settings.embedded_redis().ensure_running(), embedded=True)
