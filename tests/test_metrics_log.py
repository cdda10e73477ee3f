"""The report's reading of a GAN run's metrics.jsonl: what a kill or a hand edit leaves in it."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpgan.errors import CpganError
from cpgan.pipeline.report import read_metrics_log


def test_rows_are_kept_in_file_order_and_bad_lines_counted(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10, "loss_d": 1.5}\n'
                   "\n"
                   '{"step": 20.0, "loss_d": 1.2}\n'
                   '[1, 2]\n'                       # not an object
                   '{"loss_d": 0.9}\n'              # no step
                   '{"step": "30", "loss_d": 0.8}\n'  # a step that is not a number
                   '{"step": 5, "loss_d": 2.0}\n'
                   '{"step": 40, "loss')            # the line a kill cut
    rows, bad = read_metrics_log(log)
    assert [row["step"] for row in rows] == [10, 20.0, 5]
    assert rows[1]["loss_d"] == 1.2 and bad == 4


def test_a_missing_log_has_no_rows_and_an_unreadable_one_is_named(tmp_path: Path) -> None:
    assert read_metrics_log(tmp_path / "none.jsonl") == ([], 0)
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(CpganError) as info:
        read_metrics_log(log)
    message = str(info.value)
    assert message.startswith(f"{log}: unreadable training log (") and "\n" not in message
