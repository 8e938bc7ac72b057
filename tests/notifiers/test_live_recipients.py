"""review4: a cluster's mail recipients set through the API (the settings topic) are the ones
the notify worker mails. The UI takes and shows `email_to` per cluster, but the worker built its
channels once from the settings FILE: the operator's list was never used, silently."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from notifier_peers import SmtpFactory

from fencing.records import FenceDecision
from fencing.settings import ClusterSettings, EmailSettings, SigningSettings
from fencing.signing import write_keys_file
from streams.runtime import Runtime
from streams.settings_store import SettingsStore

pytestmark = pytest.mark.timeout(60)


async def test_cluster_recipients_set_through_the_api_are_mailed(
    fencer_settings: Any, smtp_server: SmtpFactory, decision: FenceDecision, tmp_path: Path
) -> None:
    srv = smtp_server("plain")
    keys = write_keys_file(tmp_path / "signing.keys", "k1")
    settings = fencer_settings(
        isolated_topics=True,
        signing=SigningSettings(keys_file=keys),
        email=EmailSettings(enabled=True, port=srv.port, to=["everyone@example.org"], timeout=2),
    )
    cluster = decision.host.cluster_uuid
    assert cluster is not None
    api = SettingsStore(settings, client_id="api")
    await api.start()
    runtime = Runtime(settings=settings, started_at=0.0)
    try:
        await api.put_cluster(cluster, ClusterSettings(email_to=["c1-team@example.org"]))
        table: dict[str, Any] = {}
        await runtime.notify(decision, table, decision.host.host_uuid)
        assert [e.rcpt_tos for e in srv.mailbox.envelopes] == [["c1-team@example.org"]]
        # changed again while the worker runs: the next notice follows the change
        await api.put_cluster(cluster, ClusterSettings(email_to=["night-shift@example.org"]))
        for _ in range(100):
            if runtime.current.email_to_for(cluster) == ["night-shift@example.org"]:
                break
            await asyncio.sleep(0.05)
        later = decision.model_copy(update={"decision_id": "dec-0002"})
        await runtime.notify(later, table, decision.host.host_uuid)
        assert srv.mailbox.envelopes[-1].rcpt_tos == ["night-shift@example.org"]
    finally:
        await runtime.close()
        await api.stop()
