"""Shards on ``auto`` sharing a quota that none of them knows: each keeps near a fair share of it.

Each shard's limiter measures the quota from its own throttles, so it sees only what it gets: a
shard that fell behind when the shards started measures its small share and stays there, and
probing (in successes) makes the gap grow. Measured in the shards bench: shares 0.60, 1.45, 1.78
and 0.17 of a fair share over 2 minutes. So every ``shards.share_every`` (10 s) a shard posts on
the share board (storage/shareboard.py) what it got and whether its rate held it back, reads the
others' posts, and steers its limiter (:meth:`AdaptiveRateLimiter.steer`) to within ``SLACK`` of
the mean of the shards that want more. The limiter still finds the quota itself; the board only
moves rates between shards. Shards that have no work left, or whose workers are the limit, post
``limited: false`` and do not count, so their unused share goes to the others.

The decisions (:func:`fair_share`; :meth:`ShareKeeper.sample`, from the limiter's counters) do no I/O;
the board is the edge, and a shard's time comes from its injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable

from botocore.exceptions import BotoCoreError, ClientError

from batch_upscaler.clock import Clock
from batch_upscaler.errors import FatalBackendError
from batch_upscaler.ratelimit import AdaptiveRateLimiter
from batch_upscaler.storage.shareboard import Post, ShareBoard

log = logging.getLogger(__name__)

SLACK = 1.05  # a shard's rate stays within this factor of the fair share (either way; 1.1 left the first
# shard to start at 1.2 shares in the simulation, tests/test_ratelimit.py)
STALE_PERIODS = 3  # a post older than this many periods is a shard that stopped or cannot post
SAMPLE = 32  # posts read per round, at most
_BOARD_ERRORS = (OSError, ClientError, BotoCoreError, FatalBackendError)


def fair_share(posts: Iterable[Post], now: float, stale_s: float) -> float | None:
    """The mean rate of the shards that want more (fresh posts with ``limited``); None with fewer than
    two of them, when there is nobody to share with."""
    wanting = [post.rpm for post in posts if post.limited and now - post.at <= stale_s]
    return sum(wanting) / len(wanting) if len(wanting) >= 2 else None


class ShareKeeper:
    """One shard's part: post, read, steer, every ``every_s``."""

    def __init__(self, limiter: AdaptiveRateLimiter, board: ShareBoard, label: str, clock: Clock, every_s: float,
                 wall: Callable[[], float] = time.time, rng: random.Random | None = None, where: str = "") -> None:
        self.limiter, self.board, self.label, self.clock, self.every_s = limiter, board, label, clock, every_s
        self.wall, self.rng = wall, rng or random.Random()
        self._last = (clock.now(), limiter.successes, limiter.starts, limiter.waits, limiter.throttles)
        self.rounds = 0  # posts made (the last one, on leaving, not counted)
        self.steered = 0  # rounds that moved the rate, for tests and the log
        self.where = where  # the board, as people name it (for the log)
        self._failed = False
        self._company = False  # another shard's post has been seen
        self._said_alone = False  # (a round that wants nothing more reads nothing: the warning may come later)

    def sample(self) -> Post:
        """What the shard got since the last sample: accepted per minute, and whether its rate was the
        limit (a throttle, or most starts waited for the rate)."""
        now = self.clock.now()
        then, successes, starts, waits, throttles = self._last
        self._last = (now, self.limiter.successes, self.limiter.starts, self.limiter.waits, self.limiter.throttles)
        started = self.limiter.starts - starts
        limited = self.limiter.throttles > throttles or (started > 0 and 2 * (self.limiter.waits - waits) >= started)
        rpm = (self.limiter.successes - successes) / max(now - then, 1e-6) * 60.0
        return Post(self.label, rpm, limited, self.wall())

    async def round(self) -> None:
        post = self.sample()
        await self.board.post(post)
        self.rounds += 1
        if not post.limited:
            return
        posts = await self.read()
        self._company = self._company or any(other.label != self.label for other in posts)
        if not self._company and self.rounds >= STALE_PERIODS and not self._said_alone:
            self._said_alone = True
            log.warning("rate: no other shard has posted on the share board in %s after %d rounds; if the shards "
                        "run on different machines, give them a report_dir they share (S3 or a shared "
                        "filesystem), or they may not share the quota fairly", self.where, self.rounds,
                        extra={"event": "fair_share"})
        fair = fair_share(posts, self.wall(), STALE_PERIODS * self.every_s)
        if fair is not None and self.limiter.steer(fair, SLACK):
            self.steered += 1
            log.debug("rate: steered to %.0f/min (fair share %.0f/min, got %.0f/min)", self.limiter.rpm, fair,
                      post.rpm, extra={"event": "fair_share"})

    async def read(self) -> list[Post]:
        """The others' posts, at most ``SAMPLE`` of them chosen at random: the mean of a sample is as
        good a fair share, and reading every post of every shard would grow with the square of the
        shards (on S3, 1,000 shards would make 100,000 GETs a second)."""
        labels = await self.board.labels()
        chosen = labels if len(labels) <= SAMPLE else self.rng.sample(labels, SAMPLE)
        return [post for label in chosen if (post := await self.board.get(label)) is not None]

    async def run(self) -> None:
        """Rounds until cancelled; a board that cannot be reached is logged once and tried again."""
        # Shards start together: the first round comes early (the split of the start is the one to
        # undo), and every round is jittered so the shards do not post and read in lockstep (the
        # first to post in a round would see nobody else's post of it).
        wait = self.every_s * self.rng.uniform(0.25, 0.5)
        while True:
            await self.clock.sleep(wait)
            wait = self.every_s * self.rng.uniform(0.8, 1.2)
            try:
                await self.round()
            except _BOARD_ERRORS as exc:
                if not self._failed:
                    log.warning("rate: the shards' share board cannot be used (%s); this shard finds its rate on "
                                "its own until it can", exc, extra={"event": "fair_share"})
                self._failed = True

    async def leave(self) -> None:
        """Tell the others this shard wants nothing more (its share is theirs at once, not in 3 periods)."""
        try:
            await asyncio.wait_for(self.board.post(Post(self.label, 0.0, False, self.wall())), timeout=3)
        except (*_BOARD_ERRORS, TimeoutError):
            pass  # its post goes stale in a few periods anyway
