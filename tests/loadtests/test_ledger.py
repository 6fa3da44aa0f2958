"""The load tests' loss/duplicate accounting (loadtests/ledger.py) on hand-made logs."""

from __future__ import annotations

import math

from loadtests.ledger import Lineage, Span, caught_up, check_lineage, check_span, percentile

LOG = [(1000, 0), (1000, 1), (1001, 0), (1002, 0), (1003, 0)]


def test_a_complete_span_is_clean() -> None:
    span = Span(start=(1000, 0), received=LOG[1:])
    check = check_span(span, LOG, to_end=True)
    assert check.ok
    assert (check.expected, check.received) == (4, 4)


def test_a_gap_in_the_middle_is_lost() -> None:
    span = Span(start=(1000, 0), received=[(1000, 1), (1002, 0), (1003, 0)])
    check = check_span(span, LOG, to_end=True)
    assert check.lost == 1
    assert not check.ok


def test_a_missing_tail_is_lost_only_for_a_viewer_still_connected() -> None:
    span = Span(start=(1000, 0), received=[(1000, 1), (1001, 0)])
    assert check_span(span, LOG, to_end=True).lost == 2
    assert check_span(span, LOG, to_end=False).ok  # it left: checked up to what it received


def test_duplicates_unexpected_and_order_are_counted() -> None:
    span = Span(start=(1001, 0), received=[(1002, 0), (1002, 0), (1000, 1), (1003, 0)])
    check = check_span(span, LOG, to_end=True)
    assert check.duplicates == 1
    assert check.unexpected == 1  # (1000, 1) is before the snapshot
    assert check.out_of_order == 2  # 1002-0 after itself, 1000-1 after 1002-0


def test_an_empty_snapshot_id_means_the_whole_log() -> None:
    assert check_span(Span(start=None, received=list(LOG)), LOG, to_end=True).ok


def test_a_resync_starts_a_new_span() -> None:
    lineage = Lineage("s", "u")
    lineage.record_snapshot("1000-0", resumed=False)
    lineage.record_event("1000-1")
    lineage.record_snapshot("1002-0", resumed=True)  # the relay resynchronised this viewer
    lineage.record_event("1003-0")
    assert lineage.resyncs == 1
    assert lineage.cursor() == "1003-0"
    assert check_lineage(lineage, LOG, to_end=True).ok


def test_caught_up_compares_ids_not_text() -> None:
    lineage = Lineage("s", "u")
    lineage.record_snapshot("9-0", resumed=False)
    assert not caught_up(lineage, (10, 0))  # "9-0" > "10-0" as text
    lineage.record_event("10-0")
    assert caught_up(lineage, (10, 0))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert math.isnan(percentile([], 99))
