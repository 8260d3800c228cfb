"""HTTPS through each real balancer, configured as rendered: the certificate per
host name (SNI), the TLS version floor, ALPN and the redirect listener."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import trustme

from changeover.balancers.base import BalancerError
from changeover.balancers.nginx import NginxBalancer
from changeover.balancers.nginxtls import CURRENT
from changeover.balancers.render import NGINX_TLS_CHECK_DOMAIN
from changeover.config import Topology
from changeover.tls import cert_files
from tests.certs import client_context, issue, tls11_client
from tests.helpers import free_port, wait_until
from tests.integration.realbalancers import (
    HOST,
    PRODUCTS,
    configured_driver,
    need,
    parse_site,
    running_balancer,
    running_members,
    site_data,
)

pytestmark = [
    pytest.mark.real,
    pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated"),
]


async def leaf(port: int, context: ssl.SSLContext, name: str) -> tuple[bytes, str | None]:
    context.check_hostname = False  # which certificate comes is the question
    _, writer = await asyncio.open_connection(HOST, port, ssl=context, server_hostname=name)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        return sslobj.getpeercert(binary_form=True), sslobj.selected_alpn_protocol()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("product", "tls_load"),
    [*((p, "config") for p in PRODUCTS), ("nginx", "handshake")],
    ids=[*PRODUCTS, "nginx-per-handshake"],
)
async def test_https_with_a_certificate_per_name_and_a_redirect(
    product: str, tls_load: str, tmp_path: Path
) -> None:
    """nginx also with the certificates loaded at every handshake."""
    need(product)
    ca = trustme.CA()
    certs = tmp_path / "certs"
    default = issue(ca, certs, "site", "site.test")
    shop = issue(ca, certs, "shop", "shop.test")
    qa = issue(ca, certs, "qa", "prod-a.example.com")
    data = site_data(product)
    redirect = free_port()
    data["balancer"] |= {
        "tls_cert": str(default.cert),
        "tls_key": str(default.key),
        "tls_hosts": [
            {"names": ["shop.test"], "cert": str(shop.cert), "key": str(shop.key)},
            {"names": ["prod-a.example.com"], "cert": str(qa.cert), "key": str(qa.key)},
        ],
        "redirect_listen": f"{HOST}:{redirect}",
        "tls_load": tls_load,
    }
    topology = parse_site(data, tmp_path)
    port = topology.balancer.listen.port
    async with (
        running_members(topology, logs=tmp_path),
        running_balancer(product, topology, tmp_path / "lb1") as real,
        aiohttp.ClientSession() as http,
    ):
        for name, want in (("shop.test", shop), ("prod-a.example.com", qa), ("site.test", default)):
            der, alpn = await leaf(port, client_context(ca, ["h2", "http/1.1"]), name)
            assert der == want.der, name
            assert alpn == "http/1.1", name
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await leaf(port, tls11_client(ca), "shop.test")
        url = f"https://{HOST}:{port}/"
        async with http.get(
            url, ssl=client_context(ca), server_hostname="shop.test", headers={"Host": "shop.test"}
        ) as r:  # as a browser: Apache answers 421 to an SNI name that is not the Host
            assert r.status == 200
            assert "X-Changeover-Member" in r.headers
        async with http.get(
            url, ssl=client_context(ca), server_hostname="prod-a.example.com",
            headers={"Host": "prod-a.example.com"},
        ) as r:  # fmt: skip
            assert r.headers["X-Changeover-Member"].startswith("a")  # the QA host's cluster
        async with http.get(
            f"http://{HOST}:{redirect}/cart?x=1", headers={"Host": "shop.test"},
            allow_redirects=False,
        ) as r:  # fmt: skip
            assert r.status == 308
            assert r.headers["Location"] == f"https://shop.test:{port}/cart?x=1"
        assert real.alive()


async def fresh_requests(
    port: int, ca: trustme.CA, names: list[str], stop: asyncio.Event
) -> tuple[int, list[str]]:
    """HTTPS requests, each on a new connection (a full handshake), to each of
    `names` in turn until `stop`: (answered 200, what went wrong otherwise)."""
    answered, failed = 0, []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while not stop.is_set():
            for name in names:
                try:
                    async with http.get(
                        f"https://{HOST}:{port}/", ssl=client_context(ca),
                        server_hostname=name, headers={"Host": name},
                    ) as r:  # fmt: skip
                        await r.read()
                        answered += r.status == 200
                        if r.status != 200:
                            failed.append(f"{name}: HTTP {r.status}")
                except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
                    failed.append(f"{name}: {exc!r}")
            await asyncio.sleep(0.02)
    return answered, failed


async def test_nginx_renews_certificates_without_a_reload_and_refuses_a_bad_pair(
    tmp_path: Path,
) -> None:
    """tls_load = "handshake": the driver's reload() installs a renewed pair
    without reloading nginx (same workers), the new certificate served by the very
    next handshake; a pair whose key is not its certificate's (nginx -t refuses it)
    or that nginx's workers cannot read (their own handshake does) is refused, and
    the old one keeps serving. Clients making a new handshake every 20 ms all the
    while see nothing of it."""
    need("nginx")
    ca = trustme.CA()
    certs = tmp_path / "certs"
    site = issue(ca, certs, "site", "site.test")
    shop = issue(ca, certs, "shop", "shop.test")
    data = site_data("nginx")
    data["balancer"] |= {
        "tls_cert": str(site.cert),
        "tls_key": str(site.key),
        "tls_hosts": [{"names": ["shop.test"], "cert": str(shop.cert), "key": str(shop.key)}],
        "tls_load": "handshake",
    }
    topology = parse_site(data, tmp_path)
    port = topology.balancer.listen.port
    context = client_context(ca)
    other = issue(ca, tmp_path / "other", "site", "site.test")
    renewed = issue(ca, tmp_path / "renewed", "shop", "shop.test")
    async with (
        running_members(topology, logs=tmp_path),
        running_balancer("nginx", topology, tmp_path / "lb1") as real,
    ):
        assert isinstance(real.driver, NginxBalancer)
        versions = Path(real.driver.state_dir) / "tls"
        serving = (versions / "current").readlink()
        before = sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.is_symlink())
        workers = real.workers()
        stop = asyncio.Event()
        clients = asyncio.create_task(fresh_requests(port, ca, ["site.test", "shop.test"], stop))

        async def refused(match: str) -> None:
            with pytest.raises(BalancerError, match=match) as caught:
                await real.driver.reload()
            assert "new certificates refused, the old ones keep serving" in str(caught.value)
            assert (await leaf(port, client_context(ca), "site.test"))[0] == site.der
            assert (versions / "current").readlink() == serving
            assert (
                sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.is_symlink())
                == before
            )  # the staged version removed

        # A certificate replaced, its key not (yet): nginx -t refuses the pair.
        site.cert.write_bytes(other.cert.read_bytes())
        await refused("key values mismatch")
        if os.geteuid() == 0:  # nginx's workers run as nobody: a key only root reads
            site.key.write_bytes(other.key.read_bytes())
            site.key.chmod(0o600)
            await refused("Permission denied")
        # A whole renewal, each file written in place (as a renewal tool may).
        site.key.write_bytes(other.key.read_bytes())
        site.key.chmod(0o644)
        shop.cert.write_bytes(renewed.cert.read_bytes())
        shop.key.write_bytes(renewed.key.read_bytes())
        await real.driver.reload()
        assert (await leaf(port, context, "site.test"))[0] == other.der
        assert (await leaf(port, client_context(ca), "shop.test"))[0] == renewed.der
        assert real.workers() == workers  # nginx was not reloaded
        renewal = (versions / "current").readlink()
        assert renewal != serving
        kept = {p.name for p in versions.iterdir() if p.is_dir() and not p.is_symlink()}
        assert kept == {str(serving), str(renewal)}  # older versions removed
        async with aiohttp.ClientSession() as http:  # the check server proxies nothing
            name = f"default.{NGINX_TLS_CHECK_DOMAIN}"
            async with http.get(
                f"https://{HOST}:{port}/", ssl=client_context(ca), server_hostname="site.test",
                headers={"Host": name},
            ) as r:  # fmt: skip
                assert r.status == 421
            assert (await leaf(port, client_context(ca), name))[0] == other.der
        await asyncio.sleep(0.2)  # clients' handshakes after the renewal count too
        stop.set()
        answered, failed = await clients
    assert failed == []
    assert answered > 10


async def test_nginx_handshakes_read_one_version_while_the_link_moves(tmp_path: Path) -> None:
    """The link every handshake follows, renamed back and forth between two
    versions every millisecond or so (each rename as a renewal does it: a new link
    renamed over the old one), under 300 fresh handshakes: none fails (a
    certificate of one version with the key of the other would), and each is
    served one version's certificate."""
    need("nginx")
    ca = trustme.CA()
    first = issue(ca, tmp_path / "certs", "site", HOST)
    second = issue(ca, tmp_path / "second", "site", HOST)
    data = site_data("nginx")
    data["balancer"] |= {
        "tls_cert": str(first.cert),
        "tls_key": str(first.key),
        "tls_load": "handshake",
    }
    topology = parse_site(data, tmp_path)
    port = topology.balancer.listen.port
    async with (
        running_members(topology, logs=tmp_path),
        running_balancer("nginx", topology, tmp_path / "lb1") as real,
    ):
        driver = real.driver
        assert isinstance(driver, NginxBalancer) and driver.certificates is not None
        link = Path(driver.certificates.root) / CURRENT
        versions = [link.readlink()]
        first.cert.write_bytes(second.cert.read_bytes())
        first.key.write_bytes(second.key.read_bytes())
        await driver.reload()
        versions.append(link.readlink())
        assert versions[0] != versions[1]
        stop = threading.Event()

        def flip() -> int:
            flips = 0
            while not stop.is_set():
                temporary = link.with_name(f".flip-{flips}")
                temporary.symlink_to(versions[flips % 2])
                temporary.replace(link)
                flips += 1
                time.sleep(0.001)
            return flips

        flipping = asyncio.get_running_loop().run_in_executor(None, flip)
        served: list[bytes] = []
        failed: list[str] = []
        deadline = time.monotonic() + 60  # 300 handshakes take about 3 s on a quiet box
        while len(served) + len(failed) < 300 and time.monotonic() < deadline:
            try:
                served.append((await leaf(port, client_context(ca), HOST))[0])
            except (ssl.SSLError, OSError) as exc:
                failed.append(repr(exc))
        stop.set()
        flips = await flipping
    assert failed == []
    assert len(served) == 300
    assert flips >= len(served)  # a rename per handshake or more
    assert set(served) == {first.der, second.der}


async def tls_state(topology: Topology) -> str:
    """How the config nginx runs loads its certificates, as it says itself."""
    admin = topology.balancer.admin_listen
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{admin.host}:{admin.port}/changeover/state") as r,
    ):
        state: str = (await r.json(content_type=None))["tls"]
        return state


async def test_nginx_switches_to_per_handshake_loading_by_a_reload(tmp_path: Path) -> None:
    """tls_load switched on a running nginx through the driver's reload(): with
    a key its workers cannot read, the handshakes fail their check after the
    reload and the previous config is loaded again (certificates from their files);
    with a readable one nginx is reloaded and serves the copies. Then a tls_hosts
    entry removed: its pair is carried into the new version."""
    need("nginx")
    ca = trustme.CA()
    site = issue(ca, tmp_path / "certs", "site", "site.test")
    shop = issue(ca, tmp_path / "certs", "shop", "shop.test")
    data = site_data("nginx")
    data["balancer"] |= {
        "tls_cert": str(site.cert),
        "tls_key": str(site.key),
        "tls_hosts": [{"names": ["shop.test"], "cert": str(shop.cert), "key": str(shop.key)}],
    }
    topology = parse_site(data, tmp_path)
    port = topology.balancer.listen.port

    def per_handshake(hosts: bool) -> NginxBalancer:
        balancer = data["balancer"] | {"tls_load": "handshake"}
        if not hosts:
            balancer = {k: v for k, v in balancer.items() if k != "tls_hosts"}
        changed = parse_site(data | {"balancer": balancer}, tmp_path)
        driver = configured_driver("nginx", changed, real.driver.instance, real.run_dir)
        assert isinstance(driver, NginxBalancer) and driver.certificates is not None
        return driver

    async with (
        running_members(topology, logs=tmp_path),
        running_balancer("nginx", topology, tmp_path / "lb1") as real,
    ):
        assert await tls_state(topology) == "config"
        before = real.config_text()
        switching = per_handshake(hosts=True)
        try:
            if os.geteuid() == 0:  # nginx's workers run as nobody: a key only root reads
                site.key.chmod(0o600)
                with pytest.raises(BalancerError, match="Permission denied") as caught:
                    await switching.reload()
                assert "loading the previous config again" not in str(caught.value)
                assert await tls_state(topology) == "config"
                assert real.config_text() == before
                assert (await leaf(port, client_context(ca), "site.test"))[0] == site.der
                site.key.chmod(0o644)
            workers = real.workers()
            await switching.reload()
            assert await tls_state(topology) == "handshake"
            assert real.workers() != workers  # a config change: reloaded
            assert (await leaf(port, client_context(ca), "site.test"))[0] == site.der
            assert (await leaf(port, client_context(ca), "shop.test"))[0] == shop.der
        finally:
            await switching.close()
        store = switching.certificates
        assert store is not None
        shop_label = next(f.label for f in cert_files(switching.topology) if f.names)
        removing = per_handshake(hosts=False)
        try:
            await removing.reload()
        finally:
            await removing.close()
        current = Path(store.root) / CURRENT
        assert (current / f"{shop_label}.key").is_file()  # carried: the old config had it
        assert (current / "labels").read_text().split() == ["default", shop_label]

        async def shop_gets_the_default() -> bool:  # once the old workers stopped accepting
            return (await leaf(port, client_context(ca), "shop.test"))[0] == site.der

        await wait_until(shop_gets_the_default, what="shop.test served the default")
