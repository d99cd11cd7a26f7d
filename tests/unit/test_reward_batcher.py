"""services.reward.batcher with a fake scorer: merging, order, model pinning, failures, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.reward.batcher import Batcher, BatcherStopped


class FakeScorer:
    """Scores item (call, index) as call * 1000 + index, slowly, and records every batch it saw."""

    def __init__(self, delay_s: float = 0.02, fail_on: object = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[tuple[object, list]] = []
        self.threads: set[str] = set()

    def __call__(self, model, items: list) -> list[float]:
        self.threads.add(threading.current_thread().name)
        self.batches.append((model, list(items)))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("boom")
        return [call * 1000 + index for call, index in items]


def items_of(call: int, n: int) -> list[tuple[int, int]]:
    return [(call, i) for i in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_calls_share_batches_no_larger_than_max_batch() -> None:
    scorer = FakeScorer()

    async def main():
        b = Batcher(scorer, max_batch=8, max_wait_s=0.01)
        b.start()
        results = await asyncio.gather(*(b.submit("m", items_of(c, 3)) for c in range(20)))
        await b.stop()
        return results

    results = run(main())
    sizes = [len(items) for _, items in scorer.batches]
    assert sum(sizes) == 60
    assert max(sizes) <= 8
    assert len(sizes) < 20, "calls were not merged"
    assert any(len({call for call, _ in items}) > 1 for _, items in scorer.batches)
    # Each caller gets its own scores, in the order of its items.
    for call, got in enumerate(results):
        assert got == [call * 1000 + i for i in range(3)]
    # The forward pass ran off the event loop.
    assert scorer.threads and "MainThread" not in scorer.threads


def test_a_call_larger_than_max_batch_spans_batches_in_order() -> None:
    scorer = FakeScorer(delay_s=0)

    async def main():
        b = Batcher(scorer, max_batch=8, max_wait_s=0.0)
        b.start()
        got = await b.submit("m", items_of(7, 20))
        await b.stop()
        return got

    assert run(main()) == [7000 + i for i in range(20)]
    assert [len(items) for _, items in scorer.batches] == [8, 8, 4]


def test_a_lone_call_is_not_held_longer_than_max_wait() -> None:
    scorer = FakeScorer(delay_s=0)

    async def main():
        b = Batcher(scorer, max_batch=64, max_wait_s=0.05)
        b.start()
        # A partial batch must be sent once max_wait has passed; held until full, this would never return.
        got = await asyncio.wait_for(b.submit("m", items_of(1, 2)), timeout=30)
        await b.stop()
        return got

    assert run(main()) == [1000, 1001]


def test_calls_arriving_within_max_wait_share_one_forward_pass() -> None:
    scorer = FakeScorer(delay_s=0)

    async def main():
        b = Batcher(scorer, max_batch=64, max_wait_s=0.5)
        b.start()
        first = asyncio.ensure_future(b.submit("m", items_of(1, 2)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(b.submit("m", items_of(2, 2)))
        got = await asyncio.gather(first, second)
        await b.stop()
        return got

    assert run(main()) == [[1000, 1001], [2000, 2001]]
    assert len(scorer.batches) == 1


def test_a_full_batch_does_not_wait() -> None:
    scorer = FakeScorer(delay_s=0)

    async def main():
        b = Batcher(scorer, max_batch=4, max_wait_s=10.0)
        b.start()
        got = await b.submit("m", items_of(1, 4))
        await b.stop()
        return got

    assert run(main()) == [1000, 1001, 1002, 1003]


def test_each_batch_uses_one_model_and_each_call_the_model_it_was_given() -> None:
    """What the hot swap relies on: items queued for the old version finish on it, even when a call spans
    several batches, and the new version's calls are never mixed into those batches."""
    scorer = FakeScorer(delay_s=0.01)

    async def main():
        b = Batcher(scorer, max_batch=5, max_wait_s=0.01)
        b.start()
        calls = [b.submit("v1" if c < 6 else "v2", items_of(c, 4)) for c in range(12)]
        got = await asyncio.gather(*calls)
        await b.stop()
        return got

    got = run(main())
    for call, scores in enumerate(got):
        assert scores == [call * 1000 + i for i in range(4)]
    for model, items in scorer.batches:
        assert len(items) <= 5
        assert {("v1" if call < 6 else "v2") for call, _ in items} == {model}
    # The old version's items all ran before the new version's.
    models = [m for m, _ in scorer.batches]
    assert models == sorted(models)


def test_a_failing_forward_fails_only_the_callers_in_its_batch() -> None:
    scorer = FakeScorer(delay_s=0.01, fail_on=(5, 0))

    async def main():
        b = Batcher(scorer, max_batch=4, max_wait_s=0.01)
        b.start()
        outcomes = await asyncio.gather(*(b.submit("m", items_of(c, 2)) for c in range(10)),
                                        return_exceptions=True)
        after = await b.submit("m", items_of(99, 1))  # the batcher survives
        await b.stop()
        return outcomes, after

    outcomes, after = run(main())
    assert after == [99000]
    [failed_batch] = [items for _, items in scorer.batches if (5, 0) in items]
    failed_calls = {call for call, _ in failed_batch}
    for call, outcome in enumerate(outcomes):
        if call in failed_calls:
            assert isinstance(outcome, ValueError), (call, outcome)
        else:
            assert outcome == [call * 1000, call * 1000 + 1], (call, outcome)
    assert 5 in failed_calls and len(failed_calls) < 10


def test_a_failure_in_one_part_of_a_large_call_fails_it_once() -> None:
    scorer = FakeScorer(delay_s=0, fail_on=(1, 2))

    async def main():
        b = Batcher(scorer, max_batch=2, max_wait_s=0.0)
        b.start()
        with pytest.raises(ValueError):
            await b.submit("m", items_of(1, 6))
        got = await b.submit("m", items_of(2, 3))
        await b.stop()
        return got

    assert run(main()) == [2000, 2001, 2002]
    # The failed call's items after the failing batch were dropped, not scored.
    assert (1, 4) not in [item for _, items in scorer.batches for item in items]


def test_a_wrong_number_of_scores_is_an_error_not_a_misassignment() -> None:
    async def main():
        b = Batcher(lambda model, items: [0.0], max_batch=8, max_wait_s=0.0)
        b.start()
        with pytest.raises(RuntimeError, match="1 scores for 3 items"):
            await b.submit("m", items_of(1, 3))
        await b.stop()

    run(main())


def test_a_cancelled_caller_loses_its_queued_items() -> None:
    scorer = FakeScorer(delay_s=0.1)

    async def main():
        b = Batcher(scorer, max_batch=2, max_wait_s=0.0)
        b.start()
        busy = asyncio.ensure_future(b.submit("m", items_of(1, 2)))  # occupies the worker
        await asyncio.sleep(0.03)
        gone = asyncio.ensure_future(b.submit("m", items_of(2, 2)))
        await asyncio.sleep(0.01)
        gone.cancel()
        kept = await b.submit("m", items_of(3, 1))
        assert await busy == [1000, 1001]
        await b.stop()
        return kept

    assert run(main()) == [3000]
    assert all(call != 2 for _, items in scorer.batches for call, _ in items)


def test_stop_fails_waiting_calls_and_refuses_new_ones() -> None:
    scorer = FakeScorer(delay_s=0.2)

    async def main():
        b = Batcher(scorer, max_batch=1, max_wait_s=0.0)
        b.start()
        calls = [asyncio.ensure_future(b.submit("m", items_of(c, 1))) for c in range(3)]
        await asyncio.sleep(0.05)
        await b.stop()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        with pytest.raises(BatcherStopped):
            await b.submit("m", items_of(9, 1))
        return outcomes

    outcomes = run(main())
    assert all(isinstance(o, BatcherStopped) for o in outcomes)


def test_queued_items_and_empty_calls() -> None:
    scorer = FakeScorer(delay_s=0.1)

    async def main():
        b = Batcher(scorer, max_batch=2, max_wait_s=0.0)
        b.start()
        assert await b.submit("m", []) == []
        first = asyncio.ensure_future(b.submit("m", items_of(1, 2)))
        await asyncio.sleep(0.03)
        second = asyncio.ensure_future(b.submit("m", items_of(2, 3)))
        await asyncio.sleep(0.01)
        queued = b.queued_items
        await asyncio.gather(first, second)
        assert b.queued_items == 0
        await b.stop()
        return queued

    assert run(main()) == 3
