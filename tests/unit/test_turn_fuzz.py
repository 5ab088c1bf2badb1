"""Property tests: no input makes the TURN core or the TCP framer raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_turn_core import T0, Cli, make_core

from confedge.stun import Attr, MessageBuilder, Method, MsgClass, StunError
from confedge.turn.framing import TurnStreamFramer

_METHODS = [
    Method.BINDING,
    Method.ALLOCATE,
    Method.REFRESH,
    Method.CREATE_PERMISSION,
    Method.CHANNEL_BIND,
    Method.SEND,
    0x0FF,
]
_ATTRS = [int(a) for a in Attr] + [0x7F00, 0xFFFF]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    core, _ = make_core()
    out = core.handle(T0, Cli(core).client, data)
    assert isinstance(out, list)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_METHODS),
    st.sampled_from([MsgClass.REQUEST, MsgClass.INDICATION]),
    st.lists(st.tuples(st.sampled_from(_ATTRS), st.binary(max_size=24)), max_size=6),
    st.booleans(),
)
def test_well_framed_messages_with_junk_attributes_never_raise(
    method: int, cls: int, attrs: list[tuple[int, bytes]], allocate_first: bool
) -> None:
    core, _ = make_core()
    cli = Cli(core)
    if allocate_first:
        cli.allocate(T0)
    b = MessageBuilder(method, cls, bytes(12))
    for a, v in attrs:
        b.add(a, v)
    for wire in (b.build(), b.build(key=cli.key, fingerprint=True)):
        for out in core.handle(T0, cli.client, wire):
            assert out[:2] != b""  # every answer is a built message
    core.tick(T0 + 4000)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_stream_framer_only_raises_stun_error(chunks: list[bytes]) -> None:
    framer = TurnStreamFramer()
    try:
        for chunk in chunks:
            for frame in framer.feed(chunk):
                assert len(frame) >= 4 and len(frame) % 4 == 0  # both kinds are 4-aligned
    except StunError as exc:
        assert exc.code is None
