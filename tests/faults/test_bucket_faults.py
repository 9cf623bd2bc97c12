"""The ``email-group-index`` bucket deleted while the relay runs (an operator's
mistake, a GitOps tool re-creating it): it comes back, and sends carry on."""

from __future__ import annotations

import json
import time

import pytest

from emailrelay import api
from tests.faults import figures
from tests.faults.audit import Delivered
from tests.faults.scenario import fault_scenario
from tests.support.nats_client import SyncNats
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

GROUPS = 4


def bucket_exists(client: SyncNats, bucket: str) -> bool:
    info = json.loads(client.request(f"$JS.API.STREAM.INFO.KV_{bucket}", b"", timeout=5))
    return "error" not in info


def test_group_index_bucket_deleted_while_running_comes_back_and_sends_carry_on(
    fault_smtp: SmtpServer,
) -> None:
    with fault_scenario(fault_smtp) as scene:
        run, kv = scene.run, scene.kv
        running = scene.send_load(300, concurrency=16, rate=30, groups=GROUPS, delivered_first=60)
        kv.delete_bucket(api.GROUP_INDEX_BUCKET)
        deleted_at = time.time()
        wait_until(
            lambda: bucket_exists(kv, api.GROUP_INDEX_BUCKET),
            timeout=30,
            interval=0.2,
            message="email-group-index was not re-created",
        )
        recreated_after = time.time() - deleted_at
        result = scene.result(running)

        def gone_with_the_bucket(message: Delivered) -> bool:
            return message.received_at < deleted_at

        figures.record("bucket re-created after", recreated_after, "s")
        scene.audit(result, excused=gone_with_the_bucket)
        analytics = [
            kv.request_json(api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": f"{run}-g{n}"})
            for n in range(GROUPS)
        ]
        assert result.outcomes().get("timeout", 0) == 0, "sends stalled past the caller's 10 s"
        assert [a.get("error") for a in analytics] == [None] * GROUPS, analytics
