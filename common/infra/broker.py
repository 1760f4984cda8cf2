"""Which Redis lorafleet talks to, as a redis-py client for job state and a URL for Celery.

``LORAFLEET_BROKER_URL`` (redis://, rediss:// or unix://) names a shared Redis; without it
the embedded Redis under the home folder is started or reused. A Redis watched by Sentinel
is named by its sentinels and its master's name::

    sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]      (or redis+sentinel://)

The password is the master's (and the sentinels', when they ask for one). redis-py's
Sentinel client and Celery's sentinel transport ask the sentinels for the current master
and find the new one after a failover by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio

from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.schema.errors import ConfigError, TransientError
from lorafleet.common.schema.settings import Settings

_SCHEMES = ("redis", "rediss", "unix", "sentinel", "redis+sentinel")
_SENTINEL_SCHEMES = ("sentinel", "redis+sentinel")

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
class SentinelAddress:
    """A Sentinel URL taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """ConfigError names what is wrong with a sentinel:// URL."""
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"LORAFLEET_BROKER_URL: sentinel {item!r} is not HOST:PORT")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            "LORAFLEET_BROKER_URL: a sentinel URL ends with the master's name and an optional "
            "database: sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]"
        )
    password = unquote(parts.password) if parts.password else None
    return SentinelAddress(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password)


@dataclass(frozen=True)
class Broker:
    """One Redis, addressed two ways: ``url`` for redis-py, ``celery_url`` for kombu."""

    url: str
    embedded: bool = False

    @property
    def sentinel(self) -> SentinelAddress | None:
        return parse_sentinel_url(self.url) if urlsplit(self.url).scheme in _SENTINEL_SCHEMES else None

    @property
    def celery_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            query = f"?{parts.query}" if parts.query else ""
            return f"redis+socket://{parts.path}{query}"
        sentinel = self.sentinel
        if sentinel is not None:  # kombu: one sentinel:// URL per sentinel, joined by ';'
            auth = f":{quote(sentinel.password, safe='')}@" if sentinel.password else ""
            return ";".join(
                f"sentinel://{auth}{host}:{port}/{sentinel.db}" for host, port in sentinel.sentinels
            )
        return self.url

    def transport_options(self) -> dict:
        """Celery transport options this broker needs besides lorafleet's own."""
        sentinel = self.sentinel
        if sentinel is None:
            return {}
        options: dict = {"master_name": sentinel.master}
        if sentinel.password:
            options["sentinel_kwargs"] = {"password": sentinel.password}
        return options

    def client(self, **options) -> redis.Redis:
        """A redis-py client that never hangs on a stalled Redis (CLIENT_OPTIONS); for a
        Sentinel URL, the current master's, found again after a failover."""
        from redis.sentinel import Sentinel

        return self._connect(redis.Redis, Sentinel, options)

    def async_client(self, **options) -> redis.asyncio.Redis:
        """``client()``'s asyncio twin (the same options and Sentinel handling), for waiting on
        Redis in an event loop without holding a thread: the API's event streams."""
        from redis.asyncio.sentinel import Sentinel

        return self._connect(redis.asyncio.Redis, Sentinel, options)

    def _connect(self, kind: type, sentinel_kind: type, options: dict):
        """A client of ``kind`` (redis-py's Redis, blocking or asyncio), through ``sentinel_kind``
        (its Sentinel) for a Sentinel URL."""
        defaults = dict(CLIENT_OPTIONS)
        if urlsplit(self.url).scheme == "unix":
            defaults.pop("socket_keepalive")  # a TCP option
        sentinel = self.sentinel
        if sentinel is not None:
            watchers = sentinel_kind(
                list(sentinel.sentinels),
                sentinel_kwargs={
                    "password": sentinel.password,
                    "socket_timeout": 5,
                    "socket_connect_timeout": 5,
                },
            )
            return watchers.master_for(
                sentinel.master, db=sentinel.db, password=sentinel.password, **(defaults | options)
            )
        return kind.from_url(self.url, **(defaults | options))

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
        if parts.password and self.sentinel is not None:
            return parts._replace(netloc=":***@" + parts.netloc.rsplit("@", 1)[-1]).geturl()
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
                f"LORAFLEET_BROKER_URL has scheme {scheme!r}; allowed: redis://, rediss://, unix://, "
                "sentinel:// (redis+sentinel://)"
            )
        if scheme in _SENTINEL_SCHEMES:
            parse_sentinel_url(settings.broker_url)  # a malformed one is refused here, saying what is wrong
        return Broker(settings.broker_url)
    return Broker(embedded_redis(settings).ensure_running(), embedded=True)
