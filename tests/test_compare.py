"""moa-hub eval's effective context length and its table row."""

from __future__ import annotations

from moa_hub.compare import EvalReport, card_entries, effective_length, report_rows


def test_effective_length_is_the_longest_length_before_retrieval_falls_below_threshold():
    assert effective_length({1024: 1.0, 2048: 0.9, 4096: 0.5}) == 2048
    assert effective_length({4096: 1.0, 1024: 0.95, 2048: 0.7}) == 1024  # order of the dict does not matter
    assert effective_length({1024: 0.89, 2048: 1.0}) == 0  # a later recovery does not count
    assert effective_length({512: 1.0, 1024: 1.0}) == 1024


def test_report_rows_and_card_carry_the_effective_length():
    report = EvalReport(lengths=[1024, 2048], density={1024: 0.5, 2048: 0.5})
    report.scores = {"moa": {"retrieval": {1024: 1.0, 2048: 0.9}}, "uniform": {"retrieval": {1024: 0.4, 2048: 0.3}}}
    report.effective_length = {"moa": 2048, "uniform": 0}
    rows = report_rows(report)
    assert rows[-1] == ["effective length (retrieval >= 0.9)", "-", "-", "2048", "0"]
    card = card_entries(report)
    assert card["effective length (retrieval >= 0.9) (moa / uniform)"] == "2048 / 0"
    assert card["retrieval @ 1024 tokens (moa / uniform)"] == "1.000 / 0.400"
