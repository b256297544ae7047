"""DGen: durable GenServers whose queue and state live in a transactional store."""

from dgen.codec import DecodeError, UnencodableError
from dgen.consumer import ConsumerStats
from dgen.handle import Handle, handle
from dgen.running import RunningServer, serve, start
from dgen.server import (
    Caller,
    CallTimeoutError,
    DeadLetteredError,
    DGenServer,
    ErrorInfo,
    Lock,
    MessageDeletedError,
    MessageDroppedError,
    NoReply,
    Reply,
    ReplyLostError,
    Stop,
)
from dgen.store import (
    Capabilities,
    CommitUnknownError,
    ConflictError,
    Database,
    DGenError,
    KeyTooLargeError,
    Limits,
    StoreError,
    Transaction,
    TransactionClosedError,
    TransactionTooLargeError,
    UnavailableError,
    ValueTooLargeError,
    Watch,
)
from dgen.urls import URL, BackendNotFoundError, DriverMissingError, URLError, connect

__all__ = [
    "CallTimeoutError",
    "Caller",
    "ConsumerStats",
    "DGenServer",
    "DeadLetteredError",
    "DecodeError",
    "ErrorInfo",
    "MessageDeletedError",
    "MessageDroppedError",
    "Handle",
    "Lock",
    "NoReply",
    "Reply",
    "ReplyLostError",
    "RunningServer",
    "Stop",
    "UnencodableError",
    "handle",
    "serve",
    "start",
    "URL",
    "BackendNotFoundError",
    "Capabilities",
    "CommitUnknownError",
    "ConflictError",
    "DGenError",
    "Database",
    "DriverMissingError",
    "KeyTooLargeError",
    "Limits",
    "StoreError",
    "Transaction",
    "TransactionClosedError",
    "TransactionTooLargeError",
    "URLError",
    "UnavailableError",
    "ValueTooLargeError",
    "Watch",
    "connect",
]

__version__ = "0.1.0"
