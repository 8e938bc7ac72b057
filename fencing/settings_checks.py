"""Checks across settings sections: problems that refuse a settings file and warnings that
`fencer config check` prints. Each names the setting it is about; none prints a value."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fencing.events import FenceAction
from fencing.settings_ipmi import EffectiveIpmi, IpmiSettings, ipmi_credentials_error
from fencing.settings_kafka import kafka_plaintext_warning
from fencing.settings_sections import Driver, PasswordVia

if TYPE_CHECKING:
    from fencing.settings import FencerSettings


def insecure_redfish_problems(settings: FencerSettings) -> list[tuple[str, str]]:
    """(setting path, problem) for each host whose Redfish address is not https while neither
    the host, its cluster (any cluster, the host's being unknown here) nor the defaults say
    `allow_insecure_redfish: true`. The driver refuses such an address again before a request."""
    out: list[tuple[str, str]] = []
    some_cluster = any(c.ipmi.allow_insecure_redfish for c in settings.clusters.values())
    for huuid, host in settings.hosts.items():
        address = (host.ipmi.address or "").strip()
        if "://" not in address or address.lower().startswith("https://"):
            continue
        eff = settings.effective_ipmi(huuid, None).values
        if eff.driver is not Driver.REDFISH or eff.allow_insecure_redfish or some_cluster:
            continue
        scheme = address.split("://", 1)[0]
        out.append(
            (
                f"hosts.{huuid}.ipmi.address",
                f"Redfish over {scheme}:// would send the BMC password in clear; use https, or "
                "set allow_insecure_redfish: true for this host or its cluster",
            )
        )
    return out


def fake_driver_fields(settings: FencerSettings) -> list[str]:
    """Where the settings choose driver fake (defaults, a cluster or a host)."""
    where = ["defaults.driver"] if settings.defaults.driver is Driver.FAKE else []
    fake = Driver.FAKE
    where += [
        f"clusters.{u}.ipmi.driver" for u, c in settings.clusters.items() if c.ipmi.driver is fake
    ]
    where += [f"hosts.{u}.ipmi.driver" for u, h in settings.hosts.items() if h.ipmi.driver is fake]
    return where


def ipmi_credential_problems(settings: FencerSettings) -> list[tuple[str, str]]:
    """(setting path, problem) for each IPMI user name or password IPMI 2.0 cannot carry.

    A value is reported where it is set, when the driver that would use it is `ipmi`. A host's
    cluster is not known from the settings alone: a host value is judged with the host's own
    driver, else the defaults' unless some cluster sets another driver (the driver refuses
    such a value at the pre-flight or the fence, with the same reason).
    """
    out: list[tuple[str, str]] = []

    def judge(prefix: str, eff: EffectiveIpmi, source: str) -> None:
        v = eff.values
        if v.driver is not Driver.IPMI:
            return
        for field in ("username", "password"):
            if eff.sources[field] != source:
                continue
            problem = (
                ipmi_credentials_error(v.username, None)
                if field == "username"
                else ipmi_credentials_error("", v.password)
            )
            if problem is not None:
                out.append((f"{prefix}.{field}", problem))

    judge("defaults", settings.effective_ipmi("", None), "default")
    for cuuid in settings.clusters:
        judge(f"clusters.{cuuid}.ipmi", settings.effective_ipmi("", cuuid), "cluster")
    other_drivers = any(
        c.ipmi.driver not in (None, Driver.IPMI) for c in settings.clusters.values()
    )
    for huuid, host in settings.hosts.items():
        if host.ipmi.driver is None and other_drivers:
            continue
        judge(f"hosts.{huuid}.ipmi", settings.effective_ipmi(huuid, None), "host")
    return out


# $IPMI_PASSWORD, ${IPMI_PASSWORD}, or the feature design's $IPMI_password; not $IPMI_PASSWORD_FILE.
_PASSWORD_IN_TEMPLATE = re.compile(r"\$\{?IPMI_PASSWORD\b", re.IGNORECASE)
_CHECKED_FIELDS = frozenset(
    {"driver", "execution_syntax", "password_via", "action", "restart_without_fence"}
)


# Twice the Linux NFS client's default acregmax (60 s): see attribute_cache_warning.
ATTRIBUTE_CACHE_WINDOW = 120.0


def attribute_cache_warning(settings: FencerSettings) -> str | None:
    """A warning when the stale checks after the first (check_interval x extra_checks) span less
    than twice NFS's default attribute cache lifetime. The probe opens each disk before its stat
    (close-to-open revalidation), but a `nocto` mount, or a probe user that cannot open a disk,
    leaves the stat to the attribute cache: a live VM's writes seen up to acregmax late, and
    checks in a row reading one cached mtime. None in the lab (no NFS client there)."""
    p = settings.policy
    window = p.check_interval * p.extra_checks
    if settings.lab or window >= ATTRIBUTE_CACHE_WINDOW:
        return None
    return (
        f"policy.check_interval x policy.extra_checks is {window:g} s, below "
        f"{ATTRIBUTE_CACHE_WINDOW:g} s (twice NFS's default acregmax of 60 s): where a neighbour "
        "answers a disk's stat from its NFS attribute cache (a nocto mount, or a disk the probe "
        "user cannot open), a live VM's writes can stay unseen for up to acregmax and a live "
        "host look stale; raise either, or mount with a short actimeo (operators' guide, NFS "
        "attribute caching on the neighbour)"
    )


def settings_warnings(settings: FencerSettings) -> list[str]:
    """Things that validate but that an operator should fix (printed by `config check`)."""
    warnings: list[str] = []

    def check(where: str, ipmi: IpmiSettings) -> None:
        if (
            ipmi.driver is Driver.TEMPLATE
            and ipmi.password_via is PasswordVia.ARGV
            and _PASSWORD_IN_TEMPLATE.search(ipmi.execution_syntax)
        ):
            warnings.append(
                f"{where}: the execution syntax puts $IPMI_PASSWORD in the command line, "
                "where any local user can read it in /proc; use password_via: env "
                "(ipmitool -E) or file"
            )
        if ipmi.restart_without_fence and ipmi.action in (FenceAction.NOTHING, FenceAction.BLINK):
            warnings.append(
                f"{where}: restart_without_fence with action {ipmi.action.value}: CloudStack "
                "will restart VMs of a host that may still run them (disk corruption)"
            )

    check("defaults", settings.defaults)
    # A cluster or host is checked only where it changes something the checks look at, so a
    # problem in the defaults is reported once, not once per cluster and host.
    for cuuid, cluster in settings.clusters.items():
        if cluster.ipmi.model_fields_set & _CHECKED_FIELDS:
            check(f"clusters.{cuuid}", settings.effective_ipmi("", cuuid).values)
    for huuid, host in settings.hosts.items():
        if host.ipmi.model_fields_set & _CHECKED_FIELDS:
            check(f"hosts.{huuid}", settings.effective_ipmi(huuid, None).values)
    plaintext = kafka_plaintext_warning(settings.kafka)
    if plaintext is not None:
        warnings.append(plaintext)
    if settings.ssh.user == "root" and not settings.lab:
        warnings.append(
            "ssh.user is root: the probe needs no privilege; use a dedicated user whose key is "
            "forced through fencer-probe-gate (operators' guide, section 4)"
        )
    if settings.ssh.insecure_skip_host_key_check:
        warnings.append("ssh.insecure_skip_host_key_check is on: only acceptable in the lab")
    elif settings.ssh.known_hosts is None:
        warnings.append("ssh.known_hosts is not set: probes will refuse to connect")
    cache = attribute_cache_warning(settings)
    if cache is not None:
        warnings.append(cache)
    return warnings
