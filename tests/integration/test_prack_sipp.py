"""RFC 3262 through the real PBX with SIPp as both phones (regression for issue 11.4).

The callee sends its 180 reliably and answers only after the PBX's PRACK; the caller
requires 100rel, so the PBX's own 180 to it is reliable and the caller PRACKs it.  The
scenarios check the option tags, RSeq and RAck themselves (``check_it``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .conftest import clean_env, start_pbx
from .test_calls_sipp import CALLEE, CALLER, Phones, config, read_cdrs

pytestmark = pytest.mark.integration


def test_reliable_provisionals_on_both_legs(sipp: str, tmp_path: Path) -> None:
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    extra, env = config(passwords)
    pbx = start_pbx(tmp_path, env=clean_env() | env, extra=extra)
    try:
        phones = Phones(sipp, pbx, tmp_path, passwords)
        phones.call("uas_answer_100rel.xml", "uac_call_100rel.xml")
    finally:
        assert pbx.stop() == 0
    rows = read_cdrs(tmp_path)
    assert [r["disposition"] for r in rows] == ["ANSWERED"]
    assert rows[0]["hangup_side"] == "caller"
