"""The hot path's Redis connection: one pipelined connection, one script call
per turn of the event loop.

Every call reserves before it goes upstream and settles after it, so a
gateway sends Redis two script calls per request. Through ``redis-py``'s
asyncio client each costs the gateway about 145 µs of CPU (connection pool,
stream reader, response callbacks); on a plain asyncio protocol with
``hiredis`` (the C parser ``redis-py`` itself uses) it costs about 24 µs
(measured on this project's machine, see the plugin README). And the
reserves and settles that arrive in the same turn of the event loop go
together, as the operations of one script call, so under load one round
trip serves several calls.

:class:`Link` is that connection (``redis://``, ``rediss://`` and
``unix://`` URLs; ``AUTH`` and ``SELECT`` from the URL); :class:`Batcher`
collects operations and sends each turn's as one ``EVALSHA`` (falling back
to ``EVAL`` when the server does not know the script: a ``NOSCRIPT`` reply
means it did not run, so nothing runs twice). Every failure (connection
refused or lost, no reply within the timeout) fails the operations in
flight with ``redis.exceptions.ConnectionError`` or ``TimeoutError``; the
next operation connects again. Nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Batcher", "Link"]


class Link(asyncio.Protocol):
    """One Redis connection; replies resolve the futures of the commands in
    the order they were sent."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8")
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        """Called once the connection is gone (lost, aborted or closed)."""

    @classmethod
    async def open(cls, url: str, timeout_s: float) -> Link:
        """Connect to ``url`` and authenticate.

        :raises redis.exceptions.ConnectionError: refused, timed out, or
            ``AUTH`` / ``SELECT`` failed.
        """
        opts: dict[str, Any] = dict(parse_url(url))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                if "path" in opts:
                    _, link = await loop.create_unix_connection(cls, opts["path"])
                else:
                    context = _ssl_context(opts) if opts.get("connection_class") else None
                    _, link = await loop.create_connection(
                        cls, opts.get("host", "localhost"), opts.get("port", 6379), ssl=context
                    )
                hello: list[tuple[Any, ...]] = []
                if opts.get("password"):
                    user = opts.get("username")
                    auth = ("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"])
                    hello.append(auth)
                if opts.get("db"):
                    hello.append(("SELECT", opts["db"]))
                for command in hello:
                    await link.send(command)
        except (OSError, TimeoutError, ResponseError) as e:
            raise RedisConnectionError(f"cannot connect to Redis: {e}") from e
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as e:
                self.abort(RedisConnectionError(f"Redis protocol error: {e}"))
                return
            if reply is False:
                return
            if not waiters:  # pragma: no cover - a reply nobody asked for
                self.abort(RedisConnectionError("unexpected reply from Redis"))
                return
            waiter = waiters.popleft()
            if waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(ResponseError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))
        if self.on_lost is not None:
            self.on_lost()

    def _fail(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def request(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send ``command``; the future gets its reply (a ``ResponseError``
        for an error reply)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            future.set_exception(RedisConnectionError("connection to Redis is closed"))
            return future
        self._waiters.append(future)
        self._transport.write(hiredis.pack_command(command))
        return future

    async def send(self, command: tuple[Any, ...]) -> Any:
        """Send ``command`` and wait for its reply."""
        return await self.request(command)

    def abort(self, error: Exception) -> None:
        """Fail everything in flight with ``error`` and drop the connection
        (its later replies could not be matched any more)."""
        self.closed = True
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close the connection; commands in flight fail."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()


def _ssl_context(opts: dict[str, Any]) -> ssl.SSLContext:
    """A TLS context for ``rediss://`` (``ssl_cert_reqs=none`` and
    ``ssl_ca_certs=FILE`` in the URL's query are honoured)."""
    if opts["connection_class"] is not SSLConnection:
        raise RedisConnectionError(f"unsupported Redis connection class {opts['connection_class']}")
    context = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    if str(opts.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Batcher:
    """Runs operations of one Lua script, batched per turn of the event loop.

    The script gets ``KEYS[1] = slot_key`` (every key it touches shares that
    key's hash tag), ``ARGV[1] = head`` and then one argument per operation,
    and returns one reply per operation, in order.

    :param url: the Redis URL.
    :param script: the Lua source.
    :param slot_key: the declared key (routes the call, names the slot).
    :param head: the script's first argument.
    :param timeout_s: connect timeout and the longest wait for a reply.
    :param linger_s: how long an operation submitted with ``urgent=False``
        may wait for company before it is sent on its own.
    """

    def __init__(
        self,
        url: str,
        script: str,
        slot_key: str,
        head: str,
        *,
        timeout_s: float,
        linger_s: float = 0.001,
    ) -> None:
        self.url = url
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.slot_key = slot_key
        self.head = head
        self.timeout_s = timeout_s
        self.linger_s = linger_s
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._link: Link | None = None
        self._connecting: asyncio.Task[Link] | None = None
        self._ops: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._scheduled = False
        self._closed = False
        self._tasks: set[asyncio.Future[None]] = set()
        self.on_lost: Callable[[], None] | None = None
        """Called when the connection is lost (not when :meth:`close` closes it)."""

    def submit(self, op: bytes, *, urgent: bool = True) -> asyncio.Future[Any]:
        """Queue one operation (the script's encoding of it); the future
        gets its reply once its batch comes back.

        An urgent operation goes with the current turn's batch. One that is
        not (a settle nobody waits for) waits up to ``linger_s`` for the
        next urgent one to ride along with: under load, a settle costs no
        round trip of its own."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._ops.append(op)
        self._futures.append(future)
        if urgent:
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
        elif not self._scheduled and self._timer is None:
            self._timer = loop.call_later(self.linger_s, self._flush)
        if not urgent:
            self._in_flight.add(future)
            future.add_done_callback(self._in_flight.discard)
        return future

    async def drain(self) -> None:
        """Send what waits and wait for every operation submitted without
        ``urgent`` (their failures are their submitters' business)."""
        if self._ops:
            self._flush()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))

    def _flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ops, futures = self._ops, self._futures
        self._ops, self._futures = [], []
        if not ops:
            return
        link = self._link
        if link is not None and not link.closed:
            self._send(link, ops, futures)
        else:
            task = asyncio.ensure_future(self._connect_and_send(ops, futures))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect_and_send(self, ops: list[bytes], futures: list[asyncio.Future[Any]]) -> None:
        try:
            link = await self._connected()
        except Exception as e:  # noqa: BLE001 - every waiter gets the failure
            _fail_all(futures, e)
            return
        self._send(link, ops, futures)

    async def _connected(self) -> Link:
        if self._closed:
            raise RedisConnectionError("the budget store is closed")
        if self._link is not None and not self._link.closed:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(Link.open(self.url, self.timeout_s))
        connecting = self._connecting
        try:
            link = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        link.on_lost = self._lost
        self._link = link
        return link

    def _lost(self) -> None:
        if not self._closed and self.on_lost is not None:
            self.on_lost()

    def _send(self, link: Link, ops: list[bytes], futures: list[asyncio.Future[Any]]) -> None:
        reply = link.request(("EVALSHA", self.sha, 1, self.slot_key, self.head, *ops))
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, _time_out, link, reply, self.timeout_s)
        reply.add_done_callback(lambda r: self._replied(r, timer, link, ops, futures))

    def _replied(
        self,
        reply: asyncio.Future[Any],
        timer: asyncio.TimerHandle,
        link: Link,
        ops: list[bytes],
        futures: list[asyncio.Future[Any]],
    ) -> None:
        timer.cancel()
        error = reply.exception()
        if isinstance(error, ResponseError) and str(error).startswith("NOSCRIPT"):
            # the script did not run: send its source (Redis caches it for EVALSHA)
            again = link.request(("EVAL", self.script, 1, self.slot_key, self.head, *ops))
            timer = asyncio.get_running_loop().call_later(
                self.timeout_s, _time_out, link, again, self.timeout_s
            )
            again.add_done_callback(lambda r: self._distribute(r, timer, futures))
            return
        self._distribute(reply, timer, futures)

    @staticmethod
    def _distribute(
        reply: asyncio.Future[Any], timer: asyncio.TimerHandle, futures: list[asyncio.Future[Any]]
    ) -> None:
        timer.cancel()
        error = reply.exception()
        if error is not None:
            _fail_all(futures, error)
            return
        results = reply.result()
        if not isinstance(results, list) or len(results) != len(futures):
            _fail_all(futures, ResponseError(f"unexpected reply from the budget script: {results}"))
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Send and wait for what waits, then close the connection; later
        operations fail."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), self.timeout_s)
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._link is not None:
            self._link.close()
            self._link = None


def _time_out(link: Link, reply: asyncio.Future[Any], timeout_s: float) -> None:
    if not reply.done():
        link.abort(RedisTimeoutError(f"no reply from Redis within {timeout_s:g} s"))


def _fail_all(futures: list[asyncio.Future[Any]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
