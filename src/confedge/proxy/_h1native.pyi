"""Type stub of the C extension ``confedge.proxy._h1native`` (source: ``_h1native.c``)."""

from typing import Any

def parse_request(
    buf: Any, n: int, max_url: int, max_header_bytes: int, max_headers: int
) -> (
    tuple[
        bytes,
        bytes,
        list[tuple[bytes, bytes, bytes]],
        bytes | None,
        bytes | None,
        bytes | None,
        bytes | None,
        bytes | None,
        bytes | None,
        bool,
        bytes | None,
        int,
    ]
    | None
): ...
def parse_response(
    data: Any, max_head: int
) -> tuple[int, list[tuple[bytes, bytes]], int, bool] | None: ...
