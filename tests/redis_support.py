"""The test Redis: where it runs, and the skip-or-fail rule for tests that need it.

Tests that need Redis skip with the reason when 127.0.0.1:6379 does not answer PING,
except with CI=true, where they fail instead.
"""

from __future__ import annotations

import functools
import os

import pytest

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@functools.cache
def redis_unreachable_reason() -> str | None:
    """Return why the test Redis cannot be used, or None when it replies to PING."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        client.close()
    return None


def require_redis() -> None:
    """Skip the test when Redis is unreachable, or fail it when CI=true."""
    reason = redis_unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Redis at {REDIS_HOST}:{REDIS_PORT} is required when CI=true but is not reachable: {reason}")
    pytest.skip(f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable: {reason}")
