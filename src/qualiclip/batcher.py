"""Fair micro-batching for the HTTP service: pixel budgets and two scoring lanes.

Concurrent requests share forward passes without one request starving the others: decoded
pixels in flight are bounded per request and per lane (:class:`PixelBudget`,
:class:`Admission`), and the :class:`MicroBatcher` takes work from the waiting requests in turn,
in two lanes (small images batched by the engine's grouping, large ones one at a time), each lane
in its own thread so the event loop never blocks on a forward pass. Small images never wait
behind large ones: not at a budget (each lane has its own) and not for a forward pass.

Work whose requester has gone (its task cancelled: the client hung up) is dropped: a queued job
leaves its lane at once, a running one stops at its next pass (:meth:`MicroBatcher.run` hands the
work a ``check`` to call between passes), and the cancelled call returns only once the lane has
let go of the job's pixels, so a budget released is memory really freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from qualiclip.engine import DEFAULT_MAX_BATCH_PIXELS, score_arrays

if TYPE_CHECKING:
    from qualiclip.model import Scorer

T = TypeVar("T")


class PixelBudget:
    """An asyncio semaphore counted in pixels: ``async with budget.hold(n):``.

    Waiters are served first come, first served, so a large image is never starved by a stream
    of small ones; a request of ``n`` more than the capacity is refused (``ValueError``) rather
    than left waiting for ever.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self._acquire(n)
        try:
            yield
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"{n} pixels can never fit a budget of {self.capacity}")
        if not self._waiters and n <= self.free:
            self.free -= n
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release(n)  # granted just as the waiter was cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((n, future))
                self._wake()  # a cancelled head may have been blocking smaller waiters
            raise

    def _release(self, n: int) -> None:
        self.free += n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, future = self._waiters.popleft()
            if not future.done():
                self.free -= n
                future.set_result(None)


class Admission:
    """What an image waits for before it is decoded in one lane: a slot (a count of images) and
    its pixels (a :class:`PixelBudget`), in that order. Each lane has its own, so an image never
    waits for pixels held by the other lane's images.

    Args:
        slots: most images admitted at once.
        pixels: most decoded pixels held at once.
    """

    def __init__(self, slots: int, pixels: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.pixels = PixelBudget(pixels)
        self.waiting = 0  # images not admitted yet (shown by the service's /healthz)

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """Hold a slot and ``n`` pixels for the ``async with`` block."""
        self.waiting += 1
        admitted = False
        try:
            async with self.slots:
                async with self.pixels.hold(n):
                    self.waiting -= 1
                    admitted = True
                    yield
        finally:
            if not admitted:
                self.waiting -= 1

    @property
    def pixels_held(self) -> int:
        """Decoded pixels held now (admitted images)."""
        return self.pixels.capacity - self.pixels.free


# --- micro-batching ----------------------------------------------------------------------------


class Abandoned(Exception):
    """Raised by a job's ``check`` once the request that asked for it is gone."""


@dataclass(eq=False)  # jobs are compared by identity (a queue removes this very job)
class _Job:
    """One image to score (``pixels``) or one piece of work to run alone (``work``)."""

    size: int  # the image's pixel count, fixed: the lane's accounting
    future: asyncio.Future[Any]
    pixels: np.ndarray | None = None  # dropped once scored, so a large image is not kept alive
    work: Callable[[Callable[[], None]], Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # the requester is gone
    released: asyncio.Event = field(default_factory=asyncio.Event)  # the lane let go of it

    def check(self) -> None:
        """Raise :class:`Abandoned` once the requester is gone (called between passes)."""
        if self.stop.is_set():
            raise Abandoned("the request was abandoned")


class _RoundRobin:
    """Jobs queued per owner (request), handed out one owner at a time, in turn."""

    def __init__(self) -> None:
        self._queues: dict[object, deque[_Job]] = {}  # insertion order = whose turn is next
        self._added = asyncio.Event()
        self.count = self.pixels = 0

    def put(self, owner: object, job: _Job) -> None:
        self._queues.setdefault(owner, deque()).append(job)
        self.count += 1
        self.pixels += job.size
        self._added.set()

    def peek(self) -> _Job:
        return self._queues[next(iter(self._queues))][0]

    def pop(self) -> _Job:
        owner = next(iter(self._queues))
        queue = self._queues.pop(owner)
        job = queue.popleft()
        if queue:
            self._queues[owner] = queue  # to the back of the line
        self.count -= 1
        self.pixels -= job.size
        return job

    def discard(self, owner: object, job: _Job) -> bool:
        """Take ``job`` out of the queue; ``False`` when it is no longer queued (taken)."""
        queue = self._queues.get(owner)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del self._queues[owner]
        self.count -= 1
        self.pixels -= job.size
        return True

    async def wait(self, timeout: float | None = None) -> None:
        """Until a job is added (or ``timeout`` seconds)."""
        self._added.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._added.wait(), timeout)


@dataclass
class BatchStats:
    """Counters of the batcher (shown by ``/healthz``).

    Attributes:
        images: images scored. forwards: forward passes of scoring. largest: most images in one
        pass. sizes: passes by their number of images. calls: jobs run alone (quality maps).
        dropped: jobs whose requester left before they were done (never run, or stopped).
    """

    images: int = 0
    forwards: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    calls: int = 0
    dropped: int = 0


class MicroBatcher:
    """Scores images in two lanes, taking work from the waiting requests in turn.

    Images of at most half ``max_batch_pixels`` go to the batch lane: collected for up to
    ``max_wait_s`` (or ``batch_size`` images, or ``max_batch_pixels`` pixels), one from each
    request in turn, and those of equal size and dtype share a forward pass. Larger images go to
    the large lane, one per forward pass, again one request after another. Each lane runs its
    forward passes one at a time in its own thread (torch parallelises inside each), so the
    event loop never blocks on them and small images never wait for a large one's pass.
    Other work on one image (a quality map: :meth:`run`) takes its turn in the lane of the
    image's size, alone.
    """

    def __init__(
        self, model: Scorer, *, batch_size: int, max_wait_s: float, precision: str,
        max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    ) -> None:
        self.model, self.precision = model, precision
        self.max_batch_pixels = max_batch_pixels
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.stats = BatchStats()
        self._small, self._large = _RoundRobin(), _RoundRobin()
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qualiclip-{lane}")
            for lane in ("batch", "large")
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._serve_forever(self._small, self._take_batch, self._threads[0])),
            loop.create_task(self._serve_forever(self._large, self._take_one, self._threads[1])),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for thread in self._threads:
            thread.shutdown(wait=True)

    def is_large(self, pixels: int) -> bool:
        """Whether an image of ``pixels`` pixels runs alone (the large lane)."""
        return 2 * pixels > self.max_batch_pixels

    async def score(self, pixels: np.ndarray, owner: object = None) -> float:
        """The score of one decoded ``H x W x 3`` uint8/uint16 image.

        Args:
            pixels: the image.
            owner: whose turn it is taken in (one key per request); ``None`` shares one queue.
        """
        size = int(pixels.shape[0] * pixels.shape[1])
        job = _Job(size, asyncio.get_running_loop().create_future(), pixels=pixels)
        result: float = await self._submit(job, owner)
        return result

    async def run(
        self, pixels: int, work: Callable[[Callable[[], None]], T], owner: object = None
    ) -> T:
        """``work(check)`` run alone in the lane of an image of ``pixels`` pixels, in turn.

        ``work`` runs in the lane's thread and should call ``check()`` between its passes:
        once this call is cancelled (the requester is gone), ``check`` raises
        :class:`Abandoned` and the rest of the work is skipped.
        """
        job = _Job(pixels, asyncio.get_running_loop().create_future(), work=work)
        result: T = await self._submit(job, owner)
        return result

    async def _submit(self, job: _Job, owner: object) -> Any:
        lane = self._large if self.is_large(job.size) else self._small
        lane.put(owner, job)
        try:
            # Shielded: a cancelled caller must not cancel the future under a running lane.
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.stop.set()
            if not job.future.done():
                self.stats.dropped += 1
            if lane.discard(owner, job):
                job.pixels = None
            else:  # the lane has it: return once it has let go (its pixels are really freed)
                await _wait_through_cancel(job.released)
            raise

    async def _take_one(self, lane: _RoundRobin) -> list[_Job]:
        while not lane.count:
            await lane.wait()
        return [lane.pop()]

    async def _take_batch(self, lane: _RoundRobin) -> list[_Job]:
        loop = asyncio.get_running_loop()
        while True:
            while not lane.count:
                await lane.wait()
            if lane.peek().work is None:
                # Scores wait a moment for company; work that runs alone does not.
                deadline = loop.time() + self.max_wait_s
                while 0 < lane.count < self.batch_size and lane.pixels < self.max_batch_pixels:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    await lane.wait(timeout)
            if lane.count:  # (its jobs may have been withdrawn meanwhile)
                break
        jobs = [lane.pop()]
        total = jobs[0].size
        while jobs[0].work is None and lane.count and len(jobs) < self.batch_size:
            following = lane.peek()
            if following.work is not None or total + following.size > self.max_batch_pixels:
                break
            jobs.append(lane.pop())
            total += following.size
        return jobs

    async def _serve_forever(
        self, lane: _RoundRobin, take: Callable[[_RoundRobin], Any], thread: ThreadPoolExecutor
    ) -> None:
        while True:
            jobs: list[_Job] = await take(lane)
            try:
                live = [job for job in jobs if not job.stop.is_set()]
                if live and live[0].work is not None:
                    await self._call(live[0], live[0].work, thread)
                elif live:
                    await self._score(live, thread)
            finally:
                for job in jobs:
                    job.pixels = None
                    job.released.set()
            del jobs

    async def _call(
        self, job: _Job, work: Callable[[Callable[[], None]], Any], thread: ThreadPoolExecutor
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcome: Any = await loop.run_in_executor(thread, work, job.check)
        except Exception as exc:  # noqa: BLE001 - the lane goes on; the caller gets the error
            outcome = exc
        self.stats.calls += 1
        _settle(job, outcome)

    async def _score(self, jobs: list[_Job], thread: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes, passes = await loop.run_in_executor(thread, self._forward, jobs)
        except Exception as exc:  # noqa: BLE001 - the lane goes on; these jobs get the error
            outcomes, passes = [exc] * len(jobs), []
        for n in passes:
            self.stats.forwards += 1
            self.stats.images += n
            self.stats.largest = max(self.stats.largest, n)
            self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
        for job, outcome in zip(jobs, outcomes, strict=True):
            _settle(job, outcome)

    def _forward(self, jobs: list[_Job]) -> tuple[list[float | Exception], list[int]]:
        """Score ``jobs`` (runs in a lane's thread): the engine's grouping of equal sizes."""
        arrays = [job.pixels for job in jobs if job.pixels is not None]
        return score_arrays(self.model, arrays, precision=self.precision,
                            batch_size=self.batch_size, max_batch_pixels=self.max_batch_pixels)


def _settle(job: _Job, outcome: Any) -> None:
    """Give ``job``'s caller its result or error (nobody waits for an abandoned job's)."""
    if job.future.done():
        return
    if job.stop.is_set():
        job.future.cancel()  # an exception set here would be reported as never retrieved
    elif isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)


async def _wait_through_cancel(event: asyncio.Event) -> None:
    """Wait for ``event`` even if cancelled meanwhile (the caller re-raises its cancel)."""
    while not event.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(event.wait())
