"""The "test BMC" and "confirm BMC identity" buttons' round trip: the API never talks to a BMC
(issue #15).

Rule: the API writes an `ipmi_test` (or `bmc_pin_confirm`) request on the operator-actions
topic (host, cluster, request id, who, the expected GUID: never a secret, never a setting), an
actuate worker runs the host's test action (or reads the BMC's GUID and pins it on bmc-pins)
with the BMC settings in force there (the file and the settings topic) and answers on
fencer.ipmi-tests under the request id. The API waits a bounded time for the answer; past it
the caller gets "pending" and can ask again by request id. Only answers to this process's own
requests are kept (the newest `keep`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal

from aiokafka import ConsumerRecord

from fencing.records import HostRef, IpmiTestAnswer, OperatorAction
from fencing.settings import FencerSettings

log = logging.getLogger("fencer.api")

Send = Callable[[FencerSettings, OperatorAction], Awaitable[None]]
PENDING = object()  # `answer()` of a request asked here whose answer has not come yet


class IpmiTests:
    """Requests this API process sent, and the answers the workers gave them."""

    def __init__(self, topic: str, *, send: Send | None = None, keep: int = 200) -> None:
        self.topic = topic
        self._send = send
        self._keep = keep
        self._asked: OrderedDict[str, IpmiTestAnswer | None] = OrderedDict()
        self._waiters: dict[str, asyncio.Future[IpmiTestAnswer]] = {}

    def on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A record of the ipmi-tests topic (a TopicReader callback)."""
        if record.value is None:
            return
        answer = IpmiTestAnswer.model_validate_json(record.value)
        if answer.request_id not in self._asked:
            return  # another API process's request, or one from before this process started
        self._asked[answer.request_id] = answer
        waiter = self._waiters.pop(answer.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    async def ask(
        self,
        settings: FencerSettings,
        host: HostRef,
        by: str,
        within: float = 30.0,
        *,
        kind: Literal["ipmi_test", "bmc_pin_confirm"] = "ipmi_test",
        expect: str | None = None,
    ) -> str:
        """Write the request (an IPMI test, or a BMC pin confirmation expecting `expect`); its
        id. Raises what the Kafka producer raised."""
        if self._send is None:
            from streams.actuating import send_operator_action

            self._send = send_operator_action
        request_id = uuid.uuid4().hex
        self._asked[request_id] = None
        while len(self._asked) > self._keep:
            old, _ = self._asked.popitem(last=False)
            self._waiters.pop(old, None)
        self._waiters[request_id] = asyncio.get_running_loop().create_future()
        action = OperatorAction(
            kind=kind,
            host_uuid=host.host_uuid,
            cluster_uuid=host.cluster_uuid,
            request_id=request_id,
            expect=expect,
            by=by,
            at=time.time(),
        )
        try:
            await asyncio.wait_for(self._send(settings, action), within)
        except BaseException:
            self._asked.pop(request_id, None)
            self._waiters.pop(request_id, None)
            raise
        return request_id

    async def wait(self, request_id: str, within: float) -> IpmiTestAnswer | None:
        """The answer, or None when none came within `within` seconds (still pending)."""
        answer = self._asked.get(request_id)
        if answer is not None:
            return answer
        waiter = self._waiters.get(request_id)
        if waiter is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), within)
        except TimeoutError:
            return None

    def answer(self, request_id: str) -> IpmiTestAnswer | object | None:
        """The answer; PENDING when asked here and not answered yet; None when unknown."""
        if request_id not in self._asked:
            return None
        answer = self._asked[request_id]
        return PENDING if answer is None else answer
