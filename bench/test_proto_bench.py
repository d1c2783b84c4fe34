"""Hot-path micro-benchmarks (pytest-benchmark): the Cython input kernels
against their plain-Python twin, on a pipelined burst of typical commands."""

import pytest

from mpop3.protocol import _parser as _proto
from mpop3.protocol import parser_reference as proto_reference

BURST = (
    b"USER someone\r\nPASS secret words\r\nSTAT\r\nLIST\r\nUIDL 12\r\nRETR 12\r\nTOP 3 10\r\nDELE 12\r\nQUIT\r\n" * 20
)


@pytest.mark.parametrize("proto", [_proto, proto_reference], ids=["c", "py"])
def test_split_and_parse_burst(benchmark, proto):
    def work():
        reader = proto.LineReader(512)
        return [proto.parse_command(line) for line in reader.feed(BURST)]

    result = benchmark(work)
    assert len(result) == 180 and result[2] == (proto.STAT, None, None)
