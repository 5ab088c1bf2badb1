"""Several confedge instances as one (docs/SCALING.md): what they share through Redis besides
the guard's bans -- the TURN nonce key, each instance's state and live allocations, and a
fingerprint of its REST secret."""

from confedge.cluster.core import (
    AllocationRow,
    InstanceRecord,
    decode_record,
    instance_name,
    secret_fingerprint,
)

__all__ = [
    "AllocationRow",
    "InstanceRecord",
    "decode_record",
    "instance_name",
    "secret_fingerprint",
]
