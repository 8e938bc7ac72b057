"""The API service's lifecycle: the settings store, the topic readers and the HTTPS or HTTP site,
started in order and stopped in reverse.

Rule: the API listens only after the settings, pins and audit topics were read and the fencing
view started; a certificate or key it cannot load is an error naming the setting and the path.
Listens on 127.0.0.1 unless `api.listen` says otherwise.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web
from aiokafka import ConsumerRecord

from fencing.cloudstack import CloudStack
from fencing.settings import FencerSettings
from streams.bmc_pins import BmcPinStore
from streams.settings_store import SettingsStore
from streams.topic_reader import TopicReader
from webui.app import Api, create_app
from webui.audit import AuditLog
from webui.fencing_view import FencingView
from webui.ipmi_tests import IpmiTests


def api_tls_context(settings: FencerSettings) -> ssl.SSLContext | None:
    """The server context of `api.tls_certfile` / `api.tls_keyfile`, or None (plain http)."""
    a = settings.api
    if a.tls_certfile is None or a.tls_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(a.tls_certfile), str(a.tls_keyfile))
    except FileNotFoundError as exc:
        which = "api.tls_keyfile" if exc.filename == str(a.tls_keyfile) else "api.tls_certfile"
        raise OSError(f"{which}: {exc.filename}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"api.tls_certfile / api.tls_keyfile ({a.tls_certfile}, {a.tls_keyfile}): "
            f"cannot load: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    return context


class Service:
    """The API's moving parts: settings store, topic view, HTTP site."""

    def __init__(self, settings: FencerSettings) -> None:
        from fencing.actuator import call_timeout

        self.settings = settings
        self.store = SettingsStore(settings, client_id="fencer-api-settings")
        self.view = FencingView(settings.kafka.topics)
        self.ipmi_tests = IpmiTests(settings.kafka.topics.ipmi_tests)
        self.reader = TopicReader(
            settings,
            [*self.view.topics, self.ipmi_tests.topic],
            self._on_record,
            client_id="fencer-api-view",
        )
        self.api = Api(
            settings=settings,
            store=self.store,
            view=self.view,
            cloudstack=CloudStack(settings, ttl=3.0),
            ipmi_tests=self.ipmi_tests,
            # One BMC call's deadline in the worker, and time for the two topic hops.
            ipmi_test_wait=call_timeout(settings) + 10.0,
            topics_ready=self.reader.caught_up.is_set,
            pins=BmcPinStore(settings, client_id="fencer-api-bmc-pins", read_only=True),
            audit=AuditLog(settings),
        )
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.topic == self.ipmi_tests.topic:
            self.ipmi_tests.on_record(record)
        else:
            self.view.on_record(record)

    async def start(self, port: int | None = None) -> str:
        """Read the topics, then listen; returns the base URL."""
        await self.store.start()
        try:
            await self.api.pins.start()
            assert self.api.audit is not None
            await self.api.audit.start()
            await self.reader.start()
            self._runner = web.AppRunner(create_app(self.api), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(
                self._runner,
                self.settings.api.listen,
                self.settings.api.port if port is None else port,
                ssl_context=api_tls_context(self.settings),
            )
            await site.start()
        except BaseException:
            await self.stop()
            raise
        server: Any = site._server
        sockets = server.sockets if server else []
        bound = sockets[0].getsockname()[1] if sockets else self.settings.api.port
        scheme = "https" if self.settings.api.tls_certfile else "http"
        self.url = f"{scheme}://{self.settings.api.listen}:{bound}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and reading."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.reader.stop()
        if self.api.audit is not None:
            await self.api.audit.stop()
        await self.api.pins.stop()
        await self.store.stop()
        await self.api.cloudstack.close()
