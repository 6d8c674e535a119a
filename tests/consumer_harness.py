"""The queue consumer run in the test process, against a real redis-server, with a stand-in for the model
deployment's handle (the consumer is a plain class under Serve's decorator), and a TCP proxy that can move
its clients to another Redis (a failover behind a stable address)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import redis

GOOD = {"characters": [["miku", 0.9]], "tags": {"solo": 0.8}, "model": "m", "abstained": False,
        "best_character": ["miku", 0.9]}  # fmt: skip
POISON = b"kills the replica"


class FakeModel:
    """``model.tag_many.remote(images, tags)`` as the consumer calls it: answers after ``delay`` seconds, or
    raises ActorDiedError (as a handle does when the replica died) when the poison bytes are in the call."""

    def __init__(self, delay: float = 0.0):
        self.tag_many, self.delay, self.calls, self.cancelled = self, delay, [], 0

    def remote(self, images, tags, *args):
        self.calls.append(len(images))

        async def answer():
            from ray.exceptions import ActorDiedError

            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:  # as Serve cancels the request on the replica
                self.cancelled += 1
                raise
            if any(bytes(i) == POISON for i in images):
                raise ActorDiedError()
            return [dict(GOOD) for _ in images]

        return answer()


def harness(model: FakeModel, redis_url: str, **settings):
    """A consumer in this process (call it inside a running event loop); stop it with :func:`stop`."""
    from deploy.consumer import UploadConsumer

    class Harness(UploadConsumer.func_or_class):
        def __del__(self) -> None:  # stopped by awaiting the real one (Serve awaits it the same way)
            pass

    return Harness(model, {"checkpoint": "m", "redis": redis_url, "metrics_port": 0, **settings})


async def stop(consumer) -> None:
    from deploy.consumer import UploadConsumer

    await UploadConsumer.func_or_class.__del__(consumer)


def consume(redis_url: str, model: FakeModel, until, timeout: float = 60, setup=None, **settings):
    """Run one consumer until ``until(sync_client)`` holds (or fail after ``timeout``); ``setup(consumer)`` runs
    before the consumer's loop does."""

    async def main():
        consumer = harness(model, redis_url, **settings)
        if setup is not None:
            setup(consumer)
        c = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout
        try:
            while not until(c):
                assert time.monotonic() < deadline, "timed out"
                assert not consumer.loop_task.done(), consumer.loop_task
                await asyncio.sleep(0.1)
            return consumer.status()
        finally:
            await stop(consumer)

    return asyncio.run(main())


def counter(metric, *labels) -> float:
    """A prometheus-client counter's value in this process."""
    return (metric.labels(*labels) if labels else metric)._value.get()


class Proxy:
    """A TCP proxy on a free local port to ``127.0.0.1:target``: :meth:`switch` points it at another port and
    cuts every connection it carries, as a failover behind a stable address (a Sentinel-aware service, a
    floating IP) looks to a client."""

    def __init__(self, target: int):
        self.target, self.conns, self.lock = target, set(), threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def switch(self, target: int) -> None:
        with self.lock:
            self.target = target
            conns, self.conns = self.conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.closed = True
        self.server.close()
        self.switch(self.target)
