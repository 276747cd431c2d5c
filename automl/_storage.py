"""The study storage through database outages: each call is retried with backoff for a window.

A PostgreSQL restart, a failover or a dropped connection makes every storage call raise until the
server answers again. :class:`RetryingRDBStorage` is Optuna's ``RDBStorage`` whose public calls
(:class:`optuna.storages.BaseStorage`'s methods) wait for the database instead: a call that fails
because the connection failed is retried with exponential backoff (0.5 s doubling to 10 s) for up to
``retry_s`` seconds, then raises :class:`StorageUnavailable`. The launcher says once that it is
waiting, and again when the database is back. Any other error (a constraint, a finished trial)
raises at once, as in Optuna's own storage.

A retried write can have committed before its connection broke (the answer, not the write, was
lost). Attribute writes are idempotent; a trial's final state write then meets a trial that is
already finished, and :func:`automl._records.write_trial` recognises its own record there. A
finished trial whose record cannot be written within the window goes to the study folder's journal
(:mod:`automl._recovery`), replayed by the next ``launch``/``resume``.

This module imports no Ray and no torch.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

from optuna.storages import BaseStorage, RDBStorage

__all__ = ["RetryingRDBStorage", "StorageUnavailable", "is_disconnect"]

#: First and longest pause between two tries of a call while the database does not answer.
FIRST_PAUSE_S = 0.5
LONGEST_PAUSE_S = 10.0


class StorageUnavailable(RuntimeError):
    """The study storage did not answer within ``storage_retry_s``; the message is one line."""


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a lost or refused database connection.

    SQLAlchemy's ``OperationalError`` (connection refused, server closed the connection, the server
    shutting down), ``InterfaceError`` (a closed connection used), ``DisconnectionError``, a pool
    ``TimeoutError`` and any DBAPI error that invalidated its connection; Optuna wraps them in
    ``StorageInternalError``, so the chain is walked.
    """
    return _disconnect(exc) is not None


def _disconnect(exc: BaseException) -> BaseException | None:
    from sqlalchemy import exc as sa

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError)):
            return e
        if isinstance(e, sa.DBAPIError) and e.connection_invalidated:
            return e
        e = e.__cause__ or e.__context__
    return None


def _first_line(exc: BaseException) -> str:
    """The database driver's own words (``connection refused``), not the wrappers' around them."""
    inner = _disconnect(exc) or exc
    e: BaseException = getattr(inner, "orig", None) or inner
    text = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (text[0] if text else type(e).__name__)[:300]


class RetryingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls wait up to ``retry_s`` seconds for a database that does not answer.

    Args:
        retry_s: how long one call keeps retrying a lost connection (0: raise at once).
        log: where the waiting and recovery lines go (the launcher's log).
        shown: the URL as the user may see it (password hidden).
    """

    def __init__(self, url: str, *, retry_s: float, log: Callable[[str], None] | None = None, shown: str | None = None, **kwargs: Any) -> None:
        self.retry_s = float(retry_s)
        self._log = log
        self._shown = shown or url
        self._state = _OutageState()
        super().__init__(url, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its searcher (and with it this storage): the log and lock stay behind.
        state = super().__getstate__()
        state["_log"] = None
        state["_state"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._state = _OutageState()

    def _say(self, message: str) -> None:
        (self._log or print)(message)

    def _retrying(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = self._state
        if state.local.__dict__.get("depth", 0) or self.retry_s <= 0:
            return fn(self, *args, **kwargs)  # a call inside a retried call: the outer one retries
        start: float | None = None
        pause = FIRST_PAUSE_S
        while True:
            state.local.depth = 1
            try:
                out = fn(self, *args, **kwargs)
            except Exception as exc:
                if not is_disconnect(exc):
                    raise
                now = time.monotonic()
                if start is None:
                    start = now
                    state.begin(lambda: self._say(
                        f"storage: waiting for the database ({self._shown}): {_first_line(exc)}; retrying for up to {self.retry_s:.0f}s (storage_retry_s)"
                    ))
                left = self.retry_s - (now - start)
                if left <= 0:
                    raise StorageUnavailable(
                        f"the study storage {self._shown} did not answer for {self.retry_s:.0f}s (storage_retry_s): {_first_line(exc)}"
                    ) from exc
                time.sleep(min(pause, left))
                pause = min(pause * 2, LONGEST_PAUSE_S)
                continue
            finally:
                state.local.depth = 0
            state.end(lambda waited: self._say(f"storage: the database answers again after {waited:.1f}s"))
            return out


class _OutageState:
    """One waiting line per outage, whichever thread meets it first, and one line when it ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.local = threading.local()

    def begin(self, say: Callable[[], None]) -> None:
        with self.lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        say()

    def end(self, say: Callable[[float], None]) -> None:
        if self.since is None:
            return
        with self.lock:
            since, self.since = self.since, None
        if since is not None:
            say(time.monotonic() - since)


def _wrap(name: str) -> Callable[..., Any]:
    fn = getattr(RDBStorage, name)

    @functools.wraps(fn)
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(fn, *args, **kwargs)

    return call


#: RDBStorage's own methods that Optuna's cache in front of it (``_CachedStorage``, which every
#: study over an RDB storage uses) calls directly, beside BaseStorage's public ones.
_CACHE_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials", "_set_trial_param", "record_heartbeat")

# Every call a study, a trial or the launcher makes reaches the database through one of these.
for _name in sorted({n for n in vars(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))} | set(_CACHE_CALLS)):
    if callable(getattr(RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _wrap(_name))
del _name
