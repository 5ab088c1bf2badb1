"""SASLprep (RFC 4013), the stringprep (RFC 3454) profile RFC 5389 §15.4 applies to passwords.

Theory of operation: the four stringprep steps, with the tables of the stdlib ``stringprep``
module (Unicode 3.2, exactly what RFC 3454 references):

1. Map (RFC 4013 §2.1): non-ASCII spaces (table C.1.2) become U+0020; "commonly mapped to
   nothing" characters (table B.1, e.g. U+00AD SOFT HYPHEN) are removed.
2. Normalise (§2.2): Unicode NFKC (so U+00AA "ª" becomes "a" and U+2168 "Ⅸ" becomes "IX").
3. Prohibit (§2.3): tables C.1.2, C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8, C.9.
4. Bidi (§2.4 -> RFC 3454 §6): no mixing of RandALCat and LCat characters; a string with
   RandALCat characters must start and end with one.

Unassigned code points (table A.1) are allowed, as for "queries" (RFC 3454 §7): STUN clients
hash the password as typed, and refusing a code point Unicode 3.2 did not know would lock out
users whose clients accept it.

RFC 5769 §2.4 is the test: "The\\u00adM\\u00aatr\\u2168" -> "TheMatrIX".
"""

from __future__ import annotations

import stringprep
import unicodedata

__all__ = ["saslprep"]

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str) -> str:
    """Prepare ``text`` per RFC 4013; raise ValueError naming the first prohibited character."""
    # Fast path: printable ASCII is unchanged by every step and contains no prohibited
    # character (the ASCII controls are C.2.1, and are not printable).
    if text.isascii() and text.isprintable():
        return text
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    norm = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for c in norm:
        for table in _PROHIBITED:
            if table(c):
                raise ValueError(f"SASLprep: prohibited character U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in norm):
        if any(stringprep.in_table_d2(c) for c in norm):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            raise ValueError("SASLprep: right-to-left string must start and end with RandALCat")
    return norm
