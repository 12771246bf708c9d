"""The distributed runner's hand-out of batches to workers, simulated without Ray: every batch is computed once and
written in order, and no worker idles while a batch waits in another worker's queue."""

import heapq

import pytest
from hypothesis import given, settings, strategies as st

from smoothcert.cli.distributed import IN_FLIGHT, HandOut


def simulate(durations, workers, depth=IN_FLIGHT, window=None, speeds=None):
    """Run ``HandOut`` as ``run_distributed`` does, each worker computing its queue in order (batch ``k`` takes
    ``durations[k] / speeds[w]`` on worker ``w``; a batch taken over is withdrawn where it waited). Returns the
    end time, the order of the written batches, the batches computed to the end, and every violation of
    "no worker idles while a batch waits"."""
    speeds = speeds or [1.0] * workers
    hand = HandOut(len(durations), workers, depth=depth, window=window)
    clock, events, running = 0.0, [], [None] * workers
    arrived, written, computed, violations = set(), [], [], []

    def start(w):
        if running[w] is None and hand.queues[w]:
            running[w] = k = hand.queues[w][0]
            heapq.heappush(events, (clock + durations[k] / speeds[w], w, k))

    def feed_all():
        for w in range(workers):
            while (job := hand.take(w)) is not None:
                k, moved_from = job
                assert moved_from is None or running[moved_from] != k, "a running batch was taken over"
            start(w)
        idle = [w for w in range(workers) if not hand.queues[w]]
        if idle and any(len(q) > 1 for q in hand.queues):
            violations.append((clock, [list(q) for q in hand.queues]))

    feed_all()
    while events:
        clock, w, k = heapq.heappop(events)
        running[w] = None
        hand.done(w, k)
        computed.append(k)
        arrived.add(k)
        while hand.written in arrived:
            written.append(hand.written)
            hand.written += 1
        feed_all()
    return clock, written, computed, violations


def test_few_large_batches_end_when_the_last_batch_ends():
    # Bound to the worker they were first given, batches 0 and 1 would run one after the other on worker 0 (6
    # units) while worker 1 idles after 2 units; taken over, batch 1 starts on worker 1 at time 2.
    end, written, computed, violations = simulate([3, 3, 1, 1], workers=2)
    assert end == 5
    assert written == [0, 1, 2, 3] and sorted(computed) == [0, 1, 2, 3]
    assert violations == []


def test_a_slow_worker_gives_up_its_waiting_batches():
    end, written, computed, violations = simulate([1] * 6, workers=2, speeds=[1.0, 0.1])
    assert written == list(range(6)) and sorted(computed) == list(range(6))
    # The slow worker's first batch (10 units) is running and stays; the batch behind it goes to the fast worker,
    # which computes the other five by time 5 (kept in the slow worker's queue it would end at 20).
    assert end == 10
    assert violations == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=30), st.integers(1, 4), st.integers(1, 3),
       st.one_of(st.none(), st.integers(1, 8)), st.lists(st.sampled_from([0.25, 1.0, 3.0]), min_size=4,
                                                         max_size=4))
def test_every_batch_is_computed_once_written_in_order_and_no_worker_idles_while_one_waits(
        durations, workers, depth, window, speeds):
    end, written, computed, violations = simulate(durations, workers, depth, window, speeds[:workers])
    assert written == list(range(len(durations)))
    assert sorted(computed) == list(range(len(durations)))
    assert violations == []
    # List scheduling on the fastest worker: never later than computing everything on the slowest one.
    assert end <= sum(durations) / min(speeds[:workers]) + 1e-9


def test_fresh_batches_stay_within_the_window():
    hand = HandOut(10, 2, depth=3, window=4)
    taken = [job for w in (0, 1) for job in iter(lambda w=w: hand.take(w), None)]
    assert [k for k, _ in taken] == [0, 1, 2, 3] and all(src is None for _, src in taken)
    assert hand.take(1) is None  # worker 1 is not idle: nothing is moved to it
    hand.done(0, 0)
    hand.written = 1
    assert hand.take(0) == (4, None)


@pytest.mark.parametrize("bad", [dict(batches=0, workers=1), dict(batches=1, workers=0),
                                 dict(batches=1, workers=1, depth=0)])
def test_bad_hand_out_is_refused(bad):
    with pytest.raises(ValueError):
        HandOut(**bad)
