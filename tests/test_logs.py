"""The tools' logging: records logged before the run folder exists reach train.log, in order."""
from __future__ import annotations

import logging

from emakit.training.logs import LogSetup


def test_records_before_the_log_file_are_written_first_in_order(tmp_path):
    setup = LogSetup()
    log = logging.getLogger("emakit.test")
    try:
        log.info("before %d", 1)
        log.error("an error before the file")  # an ERROR must not flush (drop) the buffer early
        log.debug("not at INFO")
        setup.add_file(str(tmp_path / "train.log"))
        log.warning("after")
    finally:
        setup.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "INFO emakit.test: before 1", "ERROR emakit.test: an error before the file", "WARNING emakit.test: after"]
    assert logging.getLogger("emakit").handlers == []  # close() removed everything it added


def test_without_a_log_file_the_buffer_stays_bounded(tmp_path):
    """validate.py never opens a log file: its early buffer must not grow without end."""
    setup = LogSetup()
    log = logging.getLogger("emakit.test")
    try:
        for i in range(10_050):
            log.info("record %d", i)
        assert 0 < len(setup.early.buffer) <= 10_000
        setup.discard_early()
        assert setup.early not in logging.getLogger("emakit").handlers
    finally:
        setup.close()
