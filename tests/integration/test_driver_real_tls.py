"""HTTPS through each real balancer, configured as rendered: the certificate per
host name (SNI), the TLS version floor, ALPN and the redirect listener."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.certs import client_context, issue, tls11_client
from tests.helpers import free_port
from tests.integration.realbalancers import (
    HOST,
    PRODUCTS,
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


@pytest.mark.parametrize("product", PRODUCTS)
async def test_https_with_a_certificate_per_name_and_a_redirect(
    product: str, tmp_path: Path
) -> None:
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
