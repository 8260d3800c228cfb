"""TLS on the embedded balancer, against a throwaway CA (trustme): a certificate
per host name (SNI), versions, ciphers and ALPN, X-Forwarded-Proto and the
Secure route cookie, the redirect listener, TLS to the members, and
certificate reloads that keep open connections and refuse a bad pair."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest
import trustme

from tests.certs import Pair, ca_file, client_context, issue, server_context, tls11_client
from tests.helpers import free_port, wait_until
from tests.integration.proxy_fixtures import (
    ConnectionCount,
    FakeMember,
    Site,
    auth,
    balancer_site,
    members,
)

LAYOUT = {"a": ["a1"], "b": ["b1"]}
QA_HOSTS = {"a": "qa-a.test"}
# A handshake the server refuses: an alert, or the connection reset.
REFUSED = (ssl.SSLError, ConnectionResetError)
RSA = trustme.KeyType.RSA


def https(url: str) -> str:
    return url.replace("http://", "https://")


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def handshake(
    url: str, context: ssl.SSLContext, name: str | None
) -> tuple[bytes, str | None, str | None]:
    """(the server's leaf certificate, the ALPN protocol, the TLS version) of one
    handshake; which certificate came is the question, so any name is accepted."""
    context.check_hostname = False
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port_of(url), ssl=context, server_hostname=name or ""
    )
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        return der, sslobj.selected_alpn_protocol(), sslobj.version()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_site(
    tmp_path: Path,
    ca: trustme.CA,
    balancer: dict[str, Any] | None = None,
    *extra: str,
    member_tls: ssl.SSLContext | None = None,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
) -> AsyncIterator[tuple[Site, list[FakeMember], dict[str, Pair]]]:
    """The balancer over TLS: `default` for any name, `shop` for shop.test and
    *.shop.test, `qa` for the QA host of cluster a."""
    where = tmp_path / "certs"
    pairs = {
        "default": issue(ca, where, "default", "site.test", key_type=key_type),
        "shop": issue(ca, where, "shop", "shop.test", "*.shop.test", key_type=key_type),
        "qa": issue(ca, where, "qa", "qa-a.test", key_type=key_type),
    }
    settings = {
        "tls_cert": str(pairs["default"].cert),
        "tls_key": str(pairs["default"].key),
        "tls_hosts": [
            {"names": ["shop.test", "*.shop.test"], "cert": str(pairs["shop"].cert),
             "key": str(pairs["shop"].key)},
            {"names": ["qa-a.test"], "cert": str(pairs["qa"].cert), "key": str(pairs["qa"].key)},
        ],
    } | (balancer or {})  # fmt: skip
    async with (
        members(LAYOUT, ssl_context=member_tls) as started,
        balancer_site(tmp_path, started, *extra, qa_hosts=QA_HOSTS, balancer=settings) as site,
    ):
        yield site, started, pairs


async def test_each_host_name_gets_its_certificate_and_http11_by_alpn(tmp_path: Path) -> None:
    ca = trustme.CA()
    async with tls_site(tmp_path, ca) as (site, _, pairs):
        url = https(site.public)
        for name, want in [
            ("shop.test", "shop"),
            ("www.shop.test", "shop"),  # the wildcard, one label deep
            ("qa-a.test", "qa"),
            ("site.test", "default"),
            ("a.www.shop.test", "default"),  # a wildcard is one label only
            (None, "default"),  # no SNI at all
        ]:
            der, alpn, _ = await handshake(url, client_context(ca, ["h2", "http/1.1"]), name)
            assert der == pairs[want].der, name
            assert alpn == "http/1.1", name  # never h2: the balancer speaks HTTP/1.1


async def test_requests_over_tls_route_by_host_and_say_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = client_context(ca)
    async with tls_site(tmp_path, ca) as (site, _, _), aiohttp.ClientSession() as client:
        url = https(site.public)
        for _ in range(4):  # the QA host name reaches its cluster only
            async with client.get(
                url + "/plain", ssl=context, server_hostname="qa-a.test",
                headers={"Host": "qa-a.test"},
            ) as r:  # fmt: skip
                assert (await r.json())["cluster"] == "a"
        async with client.get(url + "/headers", ssl=context, server_hostname="shop.test") as r:
            seen = {k.lower(): v for k, v in (await r.json())["headers"].items()}
        assert seen["x-forwarded-proto"] == "https"
        async with client.get(url + "/plain", ssl=context, server_hostname="shop.test") as r:
            cookie = r.headers["Set-Cookie"]  # the app sets none: the balancer's route cookie
        assert cookie.startswith("CHANGEOVER_ROUTE=")
        assert "; Secure" in cookie and "HttpOnly" in cookie
        with pytest.raises(aiohttp.ClientError):  # plain HTTP fails the handshake: closed
            async with client.get(site.public + "/headers"):
                pass


async def test_without_tls_no_secure_cookie_and_no_reload(tmp_path: Path) -> None:
    async with (
        members(LAYOUT) as started,
        balancer_site(tmp_path, started) as site,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(site.public + "/plain") as r:
            assert "Secure" not in r.headers["Set-Cookie"]
        status, body = await reload_via_admin(client, site)
        assert status == 409, body


def legacy_client(
    ca: trustme.CA, *, version: ssl.TLSVersion, ciphers: str | None = None
) -> ssl.SSLContext:
    context = client_context(ca)
    context.maximum_version = version
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    if ciphers:
        context.set_ciphers(ciphers)
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls12_minimum_and_modern_ciphers_by_default(tmp_path: Path) -> None:
    ca = trustme.CA()
    # RSA certificates: a suite without ECDHE could be agreed on with them.
    async with tls_site(tmp_path, ca, key_type=RSA) as (site, _, _):
        url = https(site.public)
        _, _, version = await handshake(
            url, legacy_client(ca, version=ssl.TLSVersion.TLSv1_2), "shop.test"
        )
        assert version == "TLSv1.2"
        with pytest.raises(REFUSED):
            await handshake(url, tls11_client(ca), "shop.test")
        # RSA key exchange, no forward secrecy: a TLS 1.2 suite the default list leaves out.
        old_suite = legacy_client(ca, version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256")
        with pytest.raises(REFUSED):
            await handshake(url, old_suite, "shop.test")
    ca = trustme.CA()
    widened = {"tls_ciphers": "ECDHE-RSA-AES128-GCM-SHA256:AES128-GCM-SHA256"}
    async with tls_site(tmp_path / "widened", ca, widened, key_type=RSA) as (site, _, _):
        old_suite = legacy_client(ca, version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256")
        _, _, version = await handshake(https(site.public), old_suite, "shop.test")
        assert version == "TLSv1.2"  # the same client: what refused it was the cipher list


async def test_tls13_minimum_refuses_tls12_clients(tmp_path: Path) -> None:
    ca = trustme.CA()
    async with tls_site(tmp_path, ca, {"tls_min_version": "1.3"}) as (site, _, _):
        url = https(site.public)
        with pytest.raises(REFUSED):
            await handshake(url, legacy_client(ca, version=ssl.TLSVersion.TLSv1_2), "shop.test")
        _, _, version = await handshake(url, client_context(ca), "shop.test")
        assert version == "TLSv1.3"


async def test_redirect_listener_sends_every_request_to_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    redirect = free_port()
    settings = {"redirect_listen": f"127.0.0.1:{redirect}"}
    async with (
        tls_site(tmp_path, ca, settings) as (site, started, _),
        aiohttp.ClientSession() as client,
    ):
        base = f"http://127.0.0.1:{redirect}"
        tls_port = port_of(site.public)
        for method in ("GET", "POST"):
            async with client.request(
                method, base + "/cart?item=7", headers={"Host": "shop.test:80"},
                data=b"x" * 10 if method == "POST" else None, allow_redirects=False,
            ) as r:  # fmt: skip
                assert r.status == 308, method  # 308: the method and body are kept
                assert r.headers["Location"] == f"https://shop.test:{tls_port}/cart?item=7"
        async with client.get(base + "/", headers={"Host": "a b"}, allow_redirects=False) as r:
            assert r.status == 400
        # Followed, the redirect ends on the HTTPS listener, served by a member.
        async with client.get(
            base + "/plain", headers={"Host": "shop.test"}, allow_redirects=False
        ) as r:
            target = r.headers["Location"]
        async with client.get(
            target.replace("shop.test", "127.0.0.1"), ssl=client_context(ca),
            server_hostname="shop.test",
        ) as r:  # fmt: skip
            assert r.status == 200
    assert sum(m.served for m in started) == 1  # nothing but the HTTPS request reached a member


async def test_tls_to_members_verifies_their_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    member_pair = issue(ca, tmp_path / "member", "member", "127.0.0.1")
    trusted = {"member_tls": True, "member_ca": str(ca_file(ca, tmp_path))}
    ok_site = tls_site(tmp_path / "ok", ca, trusted, member_tls=server_context(member_pair))
    async with ok_site as (site, _, _), aiohttp.ClientSession() as client:
        got = await client.get(
            https(site.public) + "/headers", ssl=client_context(ca), server_hostname="site.test"
        )
        assert got.status == 200
        assert (await got.json())["member"] in {"a1", "b1"}
    # Members whose certificates another CA signed are never used: no healthy member.
    stranger = trustme.CA()
    foreign = issue(stranger, tmp_path / "foreign", "member", "127.0.0.1")
    async with (
        tls_site(tmp_path / "foreign-site", ca, trusted, member_tls=server_context(foreign)) as (
            site,
            started,
            _,
        ),
        aiohttp.ClientSession() as client,
    ):

        async def unhealthy() -> bool:
            pool = await site.pool(client)
            return not any(m["healthy"] for m in pool.values())

        await wait_until(unhealthy, timeout=10, what="members with foreign certificates down")
        async with client.get(
            https(site.public) + "/plain", ssl=client_context(ca), server_hostname="site.test"
        ) as r:
            assert r.status in (502, 503)
        assert sum(m.served for m in started) == 0


async def reload_via_admin(client: aiohttp.ClientSession, site: Site) -> tuple[int, dict[str, Any]]:
    async with client.post(site.admin + "/v1/tls/reload", headers=auth()) as r:
        return r.status, await r.json()


async def test_a_connection_accepted_before_a_reload_gets_its_handshake_and_answer(
    tmp_path: Path,
) -> None:
    """A worker accepts a connection, then a reload retires it before the
    client's TLS handshake: the old worker waits for that handshake and answers
    the request (the connection was its own), rather than exit and reset it."""
    ca = trustme.CA()
    async with tls_site(tmp_path, ca) as (site, _, _), aiohttp.ClientSession() as client:
        (old,) = psutil.Process(site.process.pid).children()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(https(site.public)))
        try:
            mine = writer.get_extra_info("sockname")[1]

            def accepted() -> bool:
                return any(c.raddr and c.raddr.port == mine for c in old.net_connections())

            await wait_until(accepted, what="the worker to accept the connection")
            async with client.post(site.admin + "/v1/reload", headers=auth()) as r:
                assert r.status == 200, await r.text()  # the old worker is told to retire
            context = client_context(ca)
            async with client.get(
                https(site.public) + "/plain", ssl=context, server_hostname="shop.test"
            ) as r:
                assert r.status == 200  # a new connection: the new worker serves
            assert old.is_running()  # waiting for its connection's handshake
            await writer.start_tls(client_context(ca), server_hostname="shop.test")
            writer.write(b"GET /plain HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"connection: close" in head.lower()  # a retiring worker's last answer
        await wait_until(lambda: not old.is_running(), what="the old worker to exit")


async def test_a_handshake_that_never_comes_is_closed_at_the_header_timeout(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    async with tls_site(tmp_path, ca, {"timeouts": {"header": 1}}) as (site, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(https(site.public)))
        try:  # connected, and then silent: no ClientHello
            assert await asyncio.wait_for(reader.read(), 15) == b""  # closed, not held
        finally:
            writer.close()


@pytest.mark.parametrize("how", ["sighup", "admin"])
async def test_certificate_reload_keeps_open_connections_and_refuses_a_bad_pair(
    tmp_path: Path, how: str
) -> None:
    ca = trustme.CA()
    connections = ConnectionCount()
    async with (
        tls_site(tmp_path, ca, {"workers": 2}) as (site, _, pairs),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), trace_configs=[connections.trace]
        ) as kept,
        aiohttp.ClientSession() as admin,
    ):
        url = https(site.public)
        context = client_context(ca)
        async with kept.get(url + "/plain", ssl=context, server_hostname="shop.test") as r:
            assert r.status == 200
        renewed = issue(ca, tmp_path / "renewed", "shop", "shop.test", "*.shop.test")
        pairs["shop"].cert.write_bytes(renewed.cert.read_bytes())
        pairs["shop"].key.write_bytes(renewed.key.read_bytes())

        async def reload() -> tuple[int, dict[str, Any]]:
            if how == "admin":
                return await reload_via_admin(admin, site)
            site.process.send_signal(signal.SIGHUP)
            return 200, {}

        status, body = await reload()
        assert status == 200, body

        async def renewed_served() -> bool:
            der, _, _ = await handshake(url, client_context(ca), "shop.test")
            return der == renewed.der

        await wait_until(renewed_served, timeout=10, what="the renewed certificate served")
        # Every worker serves it: every new connection of a few dozen, whichever worker takes it.
        for _ in range(20):
            assert (await handshake(url, client_context(ca), "shop.test"))[0] == renewed.der
        # The connection opened before the reload still serves, on its old certificate.
        async with kept.get(url + "/plain", ssl=context, server_hostname="shop.test") as r:
            assert r.status == 200
        assert connections.opened == 1

        # A key that does not match its certificate: refused, the renewed pair keeps serving.
        other = issue(ca, tmp_path / "other", "other", "shop.test")
        pairs["shop"].key.write_bytes(other.key.read_bytes())
        if how == "admin":
            status, body = await reload_via_admin(admin, site)
            assert status == 400
            assert str(pairs["shop"].cert) in body["error"]
            assert "the old certificates still serve" in body["error"]
        else:
            site.process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: "certificates not reloaded" in site.log_text(), what="the refusal logged"
            )
        for _ in range(10):
            assert (await handshake(url, client_context(ca), "shop.test"))[0] == renewed.der
        assert site.process.returncode is None


async def test_a_bad_pair_at_start_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    good = issue(ca, tmp_path, "good", "site.test")
    other = issue(ca, tmp_path, "other", "site.test")
    settings = {"tls_cert": str(good.cert), "tls_key": str(other.key)}
    async with members(LAYOUT) as started:
        with pytest.raises(AssertionError, match="exited with 2"):
            async with balancer_site(tmp_path, started, balancer=settings):
                pass
