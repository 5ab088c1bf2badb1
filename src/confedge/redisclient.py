"""One way to open a Redis client, for every part that shares state through Redis (the guard's
store, the cluster registry): the same short timeouts, so that a Redis that does not answer
holds up neither, and the same message when the optional package is missing."""

from __future__ import annotations

from typing import Any

__all__ = ["RedisSetupError", "redis_client"]


class RedisSetupError(Exception):
    """The client cannot be made: the package is missing or the URL is malformed."""


def redis_client(url: str, key: str) -> Any:
    """An asyncio Redis client for `url` (not yet connected); `key` names the config key in
    the error (e.g. "guard.store")."""
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - depends on the installation
        raise RedisSetupError(
            f"{key} is a redis:// URL but the redis package is not installed "
            "(pip install 'confedge[redis]')"
        ) from None
    try:
        return aioredis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            health_check_interval=10,
        )
    except ValueError as exc:
        raise RedisSetupError(f"{key}: {exc}") from None
