"""DGen: durable GenServers whose queue and state live in a transactional store."""

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
