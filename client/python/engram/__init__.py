"""engram: engramd's client for Python engines (PyTorch), on libengram_client.

    import engram, torch
    with engram.connect("unix:///run/engram/engramd.sock") as client:
        table = client.open_table("engram")
        idx = table.hash(token_ids, layer=1)                  # [batch, seq_len, heads]
        rows = client.lookup(table, 1, idx, out=buffer)       # raw rows into your uint8 buffer
        emb = engram.dequantize(rows, table)                  # float32 [tokens, heads * dim]

Transports: ``unix:///path/to/engramd.sock`` (shared memory; resident tables are gathered here
from a read-only mapping, no round trip) and ``grpc://host:port``. Every call that waits releases
the GIL and takes an optional ``timeout`` in seconds. Errors are :class:`engram.Error` subclasses
(``NotFoundError``, ``InvalidArgumentError``, ``UnavailableError``, ``DataLossError``, ...) with
``.code`` and the daemon's ``.message``.
"""
from ._engram import (  # noqa: F401
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    Client,
    DataLossError,
    DeadlineExceededError,
    EngramLayer,
    Error,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    Table,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    dequantize,
)

__all__ = [
    "connect", "Client", "Table", "EngramLayer", "dequantize", "Error", "NotFoundError", "InvalidArgumentError",
    "UnavailableError", "DataLossError", "DeadlineExceededError", "FailedPreconditionError", "ResourceExhaustedError",
    "PermissionDeniedError", "InternalError", "UnimplementedError", "AlreadyExistsError", "AbortedError",
    "OutOfRangeError", "CancelledError", "UnauthenticatedError", "UnknownError",
]


def connect(uri, *, shm_data_bytes=64 << 20, timeout=30.0, connect_timeout=1.0, reconnect_backoff=0.05,
            reconnect_backoff_max=2.0, map_tables=True):
    """connect(uri, **options) -> Client

    uri: ``unix:///SOCKET`` (shared memory) or ``grpc://HOST:PORT``.
    shm_data_bytes: unix://: the arena size; the largest request's indices and rows must fit.
    timeout: seconds a call may take unless it passes its own ``timeout``.
    connect_timeout: seconds one connection attempt may wait; a call that finds the daemon gone
        waits for at most one attempt, then raises UnavailableError.
    reconnect_backoff, reconnect_backoff_max: the background reconnector's pause between failed
        attempts (seconds, doubling from the first to the second).
    map_tables: unix://: gather resident tables here from a read-only mapping (no round trip).
    Raises UnavailableError when no daemon answers, InvalidArgumentError for a malformed uri.
    """
    if not isinstance(uri, str) or not (uri.startswith("unix://") or uri.startswith("grpc://")):
        raise InvalidArgumentError("uri must be unix:///SOCKET or grpc://HOST:PORT; got %r" % (uri,))
    return Client(uri, shm_data_bytes=shm_data_bytes, timeout=timeout, connect_timeout=connect_timeout,
                  reconnect_backoff=reconnect_backoff, reconnect_backoff_max=reconnect_backoff_max,
                  map_tables=map_tables)
