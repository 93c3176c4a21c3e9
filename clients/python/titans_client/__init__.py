"""Python client for the Titans MAC inference server.

    from titans_client import TitansClient

    with TitansClient() as client:                     # TITANS_URL, else http://127.0.0.1:8000
        session = client.create_session()
        print(client.generate(session.id, "ROMEO:", max_tokens=40).text)
        for delta in client.generate(session.id, "JULIET:", max_tokens=40, stream=True):
            print(delta, end="", flush=True)

:class:`AsyncTitansClient` has the same methods as coroutines.
"""

__version__ = "0.1.0"

from ._base import DEFAULT_TIMEOUT, DEFAULT_URL, RetryPolicy  # noqa: E402
from .async_client import AsyncGenerateStream, AsyncTitansClient  # noqa: E402
from .client import GenerateStream, TitansClient  # noqa: E402
from .errors import (  # noqa: E402
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequest,
    Conflict,
    InternalServerError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerUnavailable,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    StreamError,
    Timeout,
    TitansError,
)
from .models import AppendResult, GenerateResult, Session, Usage  # noqa: E402

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AppendResult",
    "AsyncGenerateStream",
    "AsyncTitansClient",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "GenerateResult",
    "GenerateStream",
    "InternalServerError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RetryPolicy",
    "ServerUnavailable",
    "Session",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "StreamError",
    "Timeout",
    "TitansClient",
    "TitansError",
    "Usage",
    "__version__",
]
