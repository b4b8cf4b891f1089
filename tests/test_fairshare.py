"""The shards' share board and what a shard makes of it (fairshare.py, storage/shareboard.py).

The decisions are tested on the fake clock; the board on a real folder and on moto's S3 server.
How shards converge to fair shares with it is simulated in tests/test_ratelimit.py and measured
with real processes by ``python -m bench shards``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiobotocore.session import AioSession

from batch_upscaler.fairshare import SAMPLE, SLACK, ShareKeeper, fair_share
from batch_upscaler.manifest import load_settings
from batch_upscaler.ratelimit import AdaptiveRateLimiter, StartRate
from batch_upscaler.storage.s3 import S3Access
from batch_upscaler.storage.shareboard import LocalShareBoard, Post, S3ShareBoard, share_board
from batch_upscaler.storage.urls import S3Url
from tests.conftest import FakeClock, manifest_doc
from tests.s3_server import MotoS3, moto_s3

NOW = 1_800_000_000.0


def post(label: str, rpm: float, limited: bool = True, age: float = 0.0) -> Post:
    return Post(label, rpm, limited, NOW - age)


def busy(limiter: AdaptiveRateLimiter, clock: FakeClock, seconds: float) -> None:
    """Starts as fast as the limiter allows for ``seconds``, each answered at once."""
    async def go() -> None:
        end = clock.now() + seconds
        while clock.now() < end:
            await limiter.acquire()
            limiter.on_success()
    asyncio.run(go())


def test_the_fair_share_is_the_mean_of_the_fresh_shards_that_want_more() -> None:
    posts = [post("a", 100), post("b", 300), post("c", 20, limited=False), post("d", 900, age=31)]
    assert fair_share(posts, NOW, stale_s=30) == 200  # c wants no more, d is stale
    assert fair_share([post("a", 100), post("d", 900, age=31)], NOW, stale_s=30) is None  # nobody to share with
    assert fair_share([], NOW, stale_s=30) is None


def test_steer_keeps_the_rate_within_slack_of_the_fair_share(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start=StartRate(400, trusted=True))
    assert limiter.steer(200, 1.05) and limiter.rpm == pytest.approx(210)  # down to the top of the band
    assert not limiter.steer(205, 1.05) and limiter.rpm == pytest.approx(210)  # inside it: left alone
    assert limiter.steer(300, 1.05) and limiter.rpm == pytest.approx(300 / 1.05)  # up to its bottom
    capped = AdaptiveRateLimiter(clock, start=StartRate(100, trusted=True), max_rpm=150)
    assert not capped.steer(1000, 1.05) and capped.rpm == 100  # never past the limiter's own ceiling


def test_after_a_fair_share_probes_are_additive_steps_of_it(clock: FakeClock) -> None:
    """A step of 2% of the fair share every probe_s, in time, not in successes: a shard that gets little
    grows as fast as the others, and one steered down does not rush back to what it had."""
    steered = AdaptiveRateLimiter(clock, start=StartRate(400, trusted=True))
    steered.steer(200, 1.05)
    busy(steered, clock, 2.05)
    assert steered.rpm == pytest.approx(210 + 0.02 * 200)
    busy(steered, clock, 2.0)
    assert steered.rpm == pytest.approx(210 + 2 * 0.02 * 200)
    alone = AdaptiveRateLimiter(clock, start=StartRate(210, trusted=True))
    busy(alone, clock, 4.05)
    assert alone.rpm == 210  # its probes wait for 30 successes: at 210/min, 8.6 s


def test_a_sample_is_what_the_shard_got_and_whether_its_rate_held_it_back(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start=StartRate(600, trusted=True))
    keeper = ShareKeeper(limiter, LocalShareBoard(Path("/nonexistent")), "0001-of-0004", clock, 10.0,
                         wall=lambda: NOW)

    async def send(count: int, waits: bool) -> None:
        for _ in range(count):
            if waits:
                await limiter.acquire()  # waits for its slot: the rate is the limit
            else:
                clock.advance(1.0)  # a worker that comes back slower than the rate allows
                assert limiter.try_start()
            limiter.on_success()

    asyncio.run(send(50, waits=True))
    clock.t = keeper._last[0] + 10.0
    busy = keeper.sample()
    assert busy == Post("0001-of-0004", 300.0, True, NOW)  # 50 in 10 s, nearly every start waited
    asyncio.run(send(5, waits=False))
    idle = keeper.sample()
    assert not idle.limited and idle.rpm == pytest.approx(60.0)
    limiter.on_throttle()
    assert keeper.sample().limited  # a throttle: it wanted more than it got


def test_a_round_posts_then_steers_only_a_shard_that_wants_more(clock: FakeClock, tmp_path: Path) -> None:
    board = LocalShareBoard(tmp_path)
    asyncio.run(board.post(post("0000-of-0002", 100)))  # the other shard gets 100/min
    limiter = AdaptiveRateLimiter(clock, start=StartRate(600, trusted=True))
    keeper = ShareKeeper(limiter, board, "0001-of-0002", clock, 10.0, wall=lambda: NOW)

    busy(limiter, clock, 4.95)  # 50 in 5 s: 600/min, limited
    asyncio.run(keeper.round())
    mine = Post.parse((tmp_path / "shards" / "rates" / "0001-of-0002.json").read_text())
    assert mine is not None and mine.limited and mine.rpm == pytest.approx(600, rel=0.03)
    assert keeper.rounds == 1 and keeper.steered == 1
    assert limiter.rpm == pytest.approx((100 + mine.rpm) / 2 * SLACK)  # down to the top of the band
    asyncio.run(keeper.leave())
    left = Post.parse((tmp_path / "shards" / "rates" / "0001-of-0002.json").read_text())
    assert left is not None and not left.limited  # its share is the others' at once


def test_a_shard_alone_on_its_board_says_so_once(clock: FakeClock, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Shards on different machines with a local report_dir each: each board holds one post."""
    def warned(keeper: ShareKeeper) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for _ in range(6):
                busy(keeper.limiter, clock, 10)
                asyncio.run(keeper.round())
        return [r.getMessage() for r in caplog.records if "no other shard has posted" in r.getMessage()]

    alone = ShareKeeper(AdaptiveRateLimiter(clock), LocalShareBoard(tmp_path / "a"), "0002-of-0004", clock, 10.0,
                        wall=clock.now, where=str(tmp_path / "a"))
    lonely = warned(alone)
    assert len(lonely) == 1 and str(tmp_path / "a") in lonely[0] and "after 3 rounds" in lonely[0]
    assert alone.steered == 0
    idle_at_third = ShareKeeper(AdaptiveRateLimiter(clock), LocalShareBoard(tmp_path / "c"), "0001-of-0004", clock,
                                10.0, wall=clock.now)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for busy_s in (10, 10, 0, 10, 10):  # the third round wants nothing more and reads nothing
            busy(idle_at_third.limiter, clock, busy_s)
            clock.advance(10 - busy_s)
            asyncio.run(idle_at_third.round())
    assert [r for r in caplog.records if "after 4 rounds" in r.getMessage()]
    shared = LocalShareBoard(tmp_path / "b")
    asyncio.run(shared.post(Post("0003-of-0004", 100.0, True, clock.now())))
    accompanied = ShareKeeper(AdaptiveRateLimiter(clock), shared, "0002-of-0004", clock, 10.0, wall=clock.now)
    assert warned(accompanied) == [] and accompanied.steered > 0


def test_the_local_board_skips_what_it_cannot_read(tmp_path: Path) -> None:
    board = LocalShareBoard(tmp_path)
    asyncio.run(board.post(post("0000-of-0003", 120)))
    (board.folder / "0001-of-0003.json").write_text("{half a")
    (board.folder / ".0002-of-0003.77.tmp").write_text(post("0002-of-0003", 5).dumps())  # not yet renamed
    assert asyncio.run(board.labels()) == ["0000-of-0003", "0001-of-0003"]
    assert asyncio.run(board.get("0000-of-0003")) == post("0000-of-0003", 120)
    assert asyncio.run(board.get("0001-of-0003")) is None
    assert asyncio.run(board.get("0009-of-0003")) is None


def test_a_shard_reads_a_sample_of_many_posts(clock: FakeClock, tmp_path: Path) -> None:
    board = LocalShareBoard(tmp_path)
    for index in range(100):
        asyncio.run(board.post(post(f"{index:04d}-of-0100", 100 + index)))
    reads: list[str] = []
    original = board.get

    async def counted(label: str) -> Post | None:
        reads.append(label)
        return await original(label)

    board.get = counted  # type: ignore[method-assign]
    keeper = ShareKeeper(AdaptiveRateLimiter(clock), board, "0000-of-0100", clock, 10.0, rng=random.Random(1))
    posts = asyncio.run(keeper.read())
    assert len(posts) == len(reads) == SAMPLE and len(set(reads)) == SAMPLE


def test_a_board_that_fails_is_reported_once_and_the_run_goes_on(clock: FakeClock, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "shards").write_text("a file where the board's folder should be")
    limiter = AdaptiveRateLimiter(clock)
    keeper = ShareKeeper(limiter, LocalShareBoard(tmp_path), "0000-of-0002", clock, 10.0, wall=lambda: NOW,
                         rng=random.Random(0))

    async def three_rounds() -> None:
        task = asyncio.create_task(keeper.run())
        await clock.sleep(35)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await keeper.leave()  # swallowed too

    with caplog.at_level(logging.WARNING):
        asyncio.run(three_rounds())
    warnings = [r for r in caplog.records if "share board cannot be used" in r.getMessage()]
    assert len(warnings) == 1 and keeper.rounds == 0


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    yield from moto_s3()


def test_the_s3_board_posts_under_the_report_prefix(s3: MotoS3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    s3.bucket("archive-upscaled")
    settings = load_settings(_manifest(tmp_path, s3.endpoint_url))

    async def go() -> tuple[list[str], Post | None, Post | None, int]:
        async with AsyncExitStack() as stack:
            access = S3Access(AioSession(), settings.s3, stack)
            board = share_board(S3Url("archive-upscaled", "_reports/"), access)
            assert isinstance(board, S3ShareBoard)
            await board.post(post("0000-of-0002", 100))
            await board.post(post("0001-of-0002", 300))
            await board.post(post("0001-of-0002", 250))  # replaced whole
            calls = access.calls
            labels = await board.labels()
            return labels, await board.get("0001-of-0002"), await board.get("0007-of-0002"), access.calls - calls

    labels, latest, missing, calls = asyncio.run(go())
    assert labels == ["0000-of-0002", "0001-of-0002"] and latest == post("0001-of-0002", 250) and missing is None
    assert calls == 3  # one LIST, one GET per post read
    assert set(s3.keys("archive-upscaled", "_reports/")) == {"_reports/shards/rates/0000-of-0002.json",
                                                             "_reports/shards/rates/0001-of-0002.json"}


def _manifest(tmp_path: Path, endpoint: str, **overrides: Any) -> Path:
    doc = manifest_doc(output={"dir": "s3://archive-upscaled/photos/"}, s3={"endpoint_url": endpoint},
                       report_dir="s3://archive-upscaled/_reports/", **overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("value", "seconds"), [("10s", 10.0), (0, 0.0), ("1m", 60.0)])
def test_share_every_is_a_duration_and_0_turns_the_board_off(tmp_path: Path, value: object, seconds: float) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest_doc(shards={"count": 4, "share_every": value})))
    assert load_settings(path).shard.share_every_s == seconds


def test_a_bad_share_every_is_named(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest_doc(shards={"count": 4, "share_every": "often"})))
    with pytest.raises(Exception, match=r"shards\.share_every"):
        load_settings(path)
