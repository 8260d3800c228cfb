"""TLS settings: their validation, the certificate chosen per name, the redirect
target, and the expiry warning of `changeover check`."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from typer.testing import CliRunner

from changeover.cli import app
from changeover.config import ConfigError, Topology, parse
from changeover.proxy.heads import Refused
from changeover.proxy.redirect import location
from changeover.tls import Certificates, choose, expiry_warnings
from tests.certs import issue
from tests.helpers import toml_value


def site(**balancer: Any) -> dict[str, Any]:
    return {
        "clusters": [
            {"name": "a", "qa_port": 9100, "members": [{"name": "a1", "port": 9001}]},
            {"name": "b", "members": [{"name": "b1", "port": 9011}]},
        ],
        "balancer": balancer,
    }


TLS = {"tls_cert": "c.pem", "tls_key": "c.key"}


@pytest.mark.parametrize(
    ("balancer", "expected"),
    [
        ({"tls_hosts": [{"names": ["x.test"], "cert": "x", "key": "y"}]},
         "tls_hosts and redirect_listen need TLS"),
        ({"redirect_listen": "127.0.0.1:8081"}, "tls_hosts and redirect_listen need TLS"),
        ({"member_ca": "ca.pem"}, "member_ca and member_tls_name need member_tls"),
        (TLS | {"tls_hosts": [{"names": ["x.test"], "cert": "1", "key": "1"},
                              {"names": ["X.test"], "cert": "2", "key": "2"}]},
         "'x.test' has two certificates"),
        (TLS | {"tls_hosts": [{"names": ["127.0.0.1"], "cert": "1", "key": "1"}]},
         "SNI carries names only"),
        (TLS | {"tls_hosts": [{"names": ["a.*.test"], "cert": "1", "key": "1"}]},
         "SNI carries names only"),
        (TLS | {"tls_min_version": "1.1"}, "'1.2' or '1.3'"),
        (TLS | {"redirect_listen": "localhost:8080"}, "is taken by balancer.listen"),
        (TLS | {"redirect_listen": "127.0.0.1:9100"}, "is taken by clusters[0].qa_port"),
    ],
)  # fmt: skip
def test_tls_settings_are_checked(balancer: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^site\.toml: ") as info:
        parse(site(**balancer), "site.toml")
    assert expected in str(info.value)


def test_defaults_are_tls12_and_forward_secret_aead_suites() -> None:
    balancer = parse(site(**TLS), "site.toml").balancer
    assert balancer.tls_min_version == "1.2"
    assert all(s.startswith("ECDHE-") for s in balancer.tls_ciphers.split(":"))
    assert all("GCM" in s or "CHACHA20" in s for s in balancer.tls_ciphers.split(":"))


def test_a_name_gets_its_certificate_else_the_default() -> None:
    shop, qa = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    names = {"shop.test": shop, "*.shop.test": shop, "qa.test": qa}
    assert choose(names, "shop.test") is shop
    assert choose(names, "SHOP.test.") is shop  # names ignore case and a final dot
    assert choose(names, "www.shop.test") is shop
    assert choose(names, "a.www.shop.test") is None  # a wildcard covers one label
    assert choose(names, "qa.test") is qa
    assert choose(names, "other.test") is None
    assert choose(names, None) is None


@pytest.mark.parametrize(
    ("host", "target", "port", "expected"),
    [
        (b"shop.test", b"/a?b=1", 8443, b"https://shop.test:8443/a?b=1"),
        (b"Shop.Test:80", b"/", 443, b"https://shop.test/"),
        (b"[::1]:8080", b"/x", 8443, b"https://[::1]:8443/x"),
        (None, b"/x", 8443, b"https://127.0.0.1:8443/x"),  # HTTP/1.0 without Host
    ],
)
def test_redirect_location(host: bytes | None, target: bytes, port: int, expected: bytes) -> None:
    assert location(host, target, port, b"127.0.0.1") == expected


@pytest.mark.parametrize(
    ("host", "target"), [(b"a b", b"/"), (b"x/y", b"/"), (b"x", b"http://evil/"), (b"x", b"*")]
)
def test_redirect_refuses_what_is_not_a_host_and_a_path(host: bytes, target: bytes) -> None:
    with pytest.raises(Refused):
        location(host, target, 443, b"127.0.0.1")


def tls_site(tmp_path: Path, ca: trustme.CA, days: dict[str, int]) -> tuple[Topology, Path]:
    now = dt.datetime.now(dt.UTC)
    pairs = {
        label: issue(ca, tmp_path, label, f"{label}.test", not_after=now + dt.timedelta(days=d))
        for label, d in days.items()
    }
    default = pairs.pop("default")
    balancer = {
        "tls_cert": str(default.cert),
        "tls_key": str(default.key),
        "tls_hosts": [
            {"names": [f"{label}.test"], "cert": str(p.cert), "key": str(p.key)}
            for label, p in pairs.items()
        ],
    }
    path = tmp_path / "site.toml"
    data = site(**balancer)
    lines = ["[balancer]"] + [f"{k} = {toml_value(v)}" for k, v in balancer.items()]
    for c in data["clusters"]:
        lines += ["[[clusters]]"] + [f"{k} = {toml_value(v)}" for k, v in c.items()]
    path.write_text("\n".join(lines) + "\n")
    return parse(data, path), path


def test_certificates_expiring_within_21_days_are_warned(tmp_path: Path) -> None:
    ca = trustme.CA()
    topology, _ = tls_site(tmp_path, ca, {"default": 90, "soon": 20, "later": 22})
    warnings = list(expiry_warnings(topology, dt.datetime.now(dt.UTC)))
    assert len(warnings) == 1
    assert "soon.pem expires in 19 day(s)" in warnings[0]
    expired = list(expiry_warnings(topology, dt.datetime.now(dt.UTC) + dt.timedelta(days=30)))
    assert any("soon.pem expired on" in w for w in expired)


def test_changeover_check_prints_the_warning_and_still_passes(tmp_path: Path) -> None:
    ca = trustme.CA()
    _, path = tls_site(tmp_path, ca, {"default": 10})
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    # One line, however long the temporary path: never wrapped inside it.
    (warning,) = [line for line in result.output.splitlines() if line.startswith("warning:")]
    expected = f"warning: certificate {tmp_path / 'default.pem'} expires in 9 day(s)"
    assert warning.startswith(expected), warning
    _, path = tls_site(tmp_path / "fresh", ca, {"default": 60})
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0 and "warning" not in result.output


def test_a_reload_is_all_or_nothing(tmp_path: Path) -> None:
    ca = trustme.CA()
    topology, _ = tls_site(tmp_path, ca, {"default": 90, "shop": 90})
    certificates = Certificates(topology)
    before = certificates.names["shop.test"]
    other = issue(ca, tmp_path / "other", "other", "x.test")
    (tmp_path / "shop.pem.key").write_bytes(other.key.read_bytes())  # no longer its key
    with pytest.raises(ValueError, match=r"shop\.pem"):
        certificates.reload()
    assert certificates.names["shop.test"] is before


def test_members_are_reached_over_https_with_member_tls() -> None:
    plain = parse(site(), "site.toml")
    member = plain.clusters[0].members[0]
    assert plain.member_url(member) == "http://127.0.0.1:9001"
    tls = parse(site(member_tls=True), "site.toml")
    assert tls.member_url(member) == "https://127.0.0.1:9001"  # the checks' and the balancer's
