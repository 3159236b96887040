"""scripts/demo.py's FifoReader, which every whole-stack output check reads through: the bytes up
to end of file, or an error; never what had arrived when its time ran out."""
import os

import pytest

from scripts import demo


def test_the_bytes_up_to_end_of_file(tmp_path):
    fifo = str(tmp_path / "out")
    os.mkfifo(fifo)
    reader = demo.FifoReader(fifo)
    with open(fifo, "wb") as writer:
        writer.write(b"x" * 200_000)
    assert reader.result(10) == b"x" * 200_000


def test_a_stream_that_does_not_end_is_an_error(tmp_path):
    fifo = str(tmp_path / "out")
    os.mkfifo(fifo)
    reader = demo.FifoReader(fifo)
    writer = os.open(fifo, os.O_WRONLY)  # held open: no end of file
    try:
        os.write(writer, b"partial")
        with pytest.raises(TimeoutError, match=r"no end of file after 1 s \(7 bytes so far"):
            reader.result(1)
    finally:
        os.close(writer)
    assert reader.result(10) == b"partial"


def test_a_stream_that_cannot_be_read_is_an_error(tmp_path):
    reader = demo.FifoReader(str(tmp_path / "absent"))
    with pytest.raises(OSError, match="absent"):
        reader.result(10)
