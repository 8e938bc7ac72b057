"""Security-relevant settings: the probe user's default, the API's token hashes, proxies and
TLS files are checked where they are read, naming the setting."""

from __future__ import annotations

import pytest

from fencing.settings import FencerSettings, SettingsError, load_settings, settings_warnings


def test_the_probe_user_is_not_root_by_default_and_root_is_warned_about():
    assert FencerSettings().ssh.user == "fencer-probe"
    root = FencerSettings(ssh={"user": "root", "known_hosts": "/etc/fencer/known_hosts"})
    assert any(w.startswith("ssh.user is root") for w in settings_warnings(root))
    assert not any(w.startswith("ssh.user") for w in settings_warnings(FencerSettings()))


@pytest.mark.parametrize(
    ("api", "named"),
    [
        ({"tokens": {"ops": "the-token-itself"}}, "api.tokens.ops"),
        ({"tokens": {"ops": "sha256:" + "A" * 64}}, "api.tokens.ops"),
        ({"tls_certfile": "/etc/fencer/api.pem"}, "api.tls_certfile"),
        ({"trusted_proxies": ["10.0.0.1", "not-an-address"]}, "api.trusted_proxies.1"),
    ],
)
def test_bad_api_security_settings_name_the_field(api, named):
    with pytest.raises(SettingsError) as err:
        load_settings(None, api=api)
    assert named in str(err.value)
    assert "the-token-itself" not in str(err.value)


def test_good_api_security_settings_load():
    s = load_settings(
        None,
        api={
            "tokens": {"ops": "sha256:" + "a" * 64},
            "trusted_proxies": ["10.0.0.0/8", "::1"],
            "tls_certfile": "/c.pem",
            "tls_keyfile": "/k.pem",
        },
    )
    assert s.api.trusted_proxies == ["10.0.0.0/8", "::1"]
