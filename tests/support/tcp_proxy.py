"""A TCP proxy that adds latency, per direction, changeable while connections are open.

This kernel has no `tc netem`, so delay is made in user space: every chunk read from one side is
stamped and written to the other side `delay` seconds later, in order. Reading never waits for the
delay (a chunk read at t goes out at t + delay however many are queued), so the proxy adds latency
without capping throughput; a bounded queue per direction gives back-pressure instead of memory
growth. Changing the delay affects chunks read afterwards; order is kept either way.

    with DelayProxy(("10.0.0.1", 0), ("127.0.0.1", 1883)) as proxy:   # listen, target
        proxy.set_delay(up_s=0.2, down_s=0.2)   # up: client -> target, down: target -> client

It runs its own asyncio loop in a thread, so a synchronous test or scenario drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_CHUNK = 64 * 1024
_QUEUE = 1024  # chunks buffered per direction before the reader waits (back-pressure)


@dataclass
class ProxyStats:
    connections: int = 0
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class DelayProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], up_s: float = 0.0,
                 down_s: float = 0.0) -> None:
        self.listen_host, self._listen_port = listen
        self.target = target
        self.up_s, self.down_s = up_s, down_s
        self.stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    # ---- control (any thread) ----------------------------------------------------------------------
    def set_delay(self, up_s: float, down_s: float) -> None:
        """Added latency per direction from now on (floats are assigned atomically)."""
        self.up_s, self.down_s = max(0.0, up_s), max(0.0, down_s)

    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._main, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"proxy could not listen on {self.listen_host}:{self._listen_port}: {self._error}")
        return self

    def close(self) -> None:
        """Stop listening and cut every open connection; returns when the loop has ended."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- the loop thread -------------------------------------------------------------------------
    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen_host, self._listen_port, reuse_address=True))
            self.port = int(self._server.sockets[0].getsockname()[1])
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _shutdown(self) -> None:
        loop = self._loop  # a local: the closure below keeps the narrowed type
        assert loop is not None
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()

        async def _finish() -> None:
            if self._conns:
                await asyncio.gather(*self._conns, return_exceptions=True)
            loop.stop()

        loop.create_task(_finish())

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        t_writer: asyncio.StreamWriter | None = None
        try:
            try:
                t_reader, target_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            except (OSError, asyncio.TimeoutError):
                return  # the target is down: the client sees its connection closed, as with a dead broker
            t_writer = target_writer  # for the finally below
            await asyncio.gather(self._pump(c_reader, target_writer, up=True),
                                 self._pump(t_reader, c_writer, up=False))
        except asyncio.CancelledError:
            pass
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self.stats.active -= 1
            self._conns.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """Copy reader -> writer, each chunk held until read time + this direction's delay."""
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE)

        async def read() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    await q.put((time.monotonic() + (self.up_s if up else self.down_s), data))
            except (ConnectionError, OSError):
                pass
            await q.put((0.0, b""))  # end of stream, after what is queued

        async def write() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: pass the peer's FIN on

        rt, wt = asyncio.ensure_future(read()), asyncio.ensure_future(write())
        try:
            await wt
        except (ConnectionError, OSError):
            pass  # the far side went away: closing both ends (in _handle) tells the near side
        finally:
            rt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await rt
