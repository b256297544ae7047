"""The queue's hand-built ordered-commit keys equal what the tuple layer builds."""

from __future__ import annotations

import pytest

from dgen.keys import Versionstamp, pack_with_versionstamp
from dgen.queue import TenantKeys


@pytest.mark.parametrize("tenant", ["t", "a\x00b", "ünï"])
@pytest.mark.parametrize("user_version", [0, 1, 300, 65535])
def test_queue_stamp_prefix_matches_pack_with_versionstamp(tenant: str, user_version: int) -> None:
    keys = TenantKeys(tenant)
    main, offset = pack_with_versionstamp(("q", Versionstamp(None, user_version)), keys.prefix)
    assert offset == len(keys.queue_stamp_prefix)
    assert main == keys.queue_stamp_prefix + b"\xff" * 10 + user_version.to_bytes(2, "big")
