"""Rendered balancer configs: what each admission becomes, what is refused, and
that each product's own checker accepts the result (TLS included)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import trustme

from changeover.balancers.render import RenderError, RenderOptions, render
from changeover.config import BalancerInstance, Topology, parse
from changeover.model import Admission
from tests.certs import ca_file, issue
from tests.integration.realbalancers import PRODUCTS, need

LIVE, DRAINING, OUT = Admission.LIVE, Admission.DRAINING, Admission.OUT
MIXED = {"a1": DRAINING, "a2": OUT}


def topology(balancer: dict[str, Any] | None = None, route: str | None = None) -> Topology:
    a1: dict[str, Any] = {"name": "a1", "port": 9101}
    if route:
        a1["route"] = route
    return parse(
        {
            "clusters": [
                {
                    "name": "a",
                    "qa_host": "prod-a.example.com",
                    "qa_port": 8801,
                    "members": [a1, {"name": "a2", "port": 9102}, {"name": "a3", "port": 9103}],
                },
                {
                    "name": "b",
                    "qa_host": "prod-b.example.com",
                    "members": [{"name": "b1", "port": 9111}],
                },
            ],
            "balancer": {"listen": "127.0.0.1:8800", "admin_listen": "127.0.0.1:8899"}
            | (balancer or {}),
        }
    )


def tls_settings(where: Path, full: bool) -> dict[str, Any]:
    """TLS on the listeners from a throwaway CA; `full`: every TLS setting there is."""
    ca = trustme.CA()
    default = issue(ca, where, "site", "site.example.com")
    settings: dict[str, Any] = {"tls_cert": str(default.cert), "tls_key": str(default.key)}
    if full:
        shop = issue(ca, where, "shop", "shop.example.com", "*.shop.example.com")
        qa = issue(ca, where, "qa", "prod-a.example.com")
        settings |= {
            "tls_hosts": [
                {"names": ["shop.example.com", "*.shop.example.com"],
                 "cert": str(shop.cert), "key": str(shop.key)},
                {"names": ["prod-a.example.com"], "cert": str(qa.cert), "key": str(qa.key)},
            ],
            "tls_min_version": "1.3",
            "redirect_listen": "127.0.0.1:8880",
            "member_tls": True,
            "member_ca": str(ca_file(ca, where)),
            "member_tls_name": "members.example.com",
        }  # fmt: skip
    return settings


def test_every_product_carries_the_tls_settings(tmp_path: Path) -> None:
    topo = topology(tls_settings(tmp_path, full=True))
    shop, qa = str(tmp_path / "shop.pem"), str(tmp_path / "qa.pem")
    haproxy = render(topo, "haproxy")
    bind = lines_with(haproxy, "bind 127.0.0.1:8800")[0]
    assert f"crt {tmp_path / 'site.pem'} crt {shop} crt {qa}" in bind
    assert "ssl-min-ver TLSv1.3" in bind and "alpn http/1.1" in bind
    assert "ciphers ECDHE-ECDSA-AES128-GCM-SHA256:" in bind
    assert "code 308" in lines_with(haproxy, "http-request redirect location")[0]
    assert "verifyhost members.example.com" in lines_with(haproxy, "server a1 127")[0]
    nginx = render(topo, "nginx")
    assert "ssl_protocols TLSv1.3;" in nginx
    assert "server_name shop.example.com *.shop.example.com;" in nginx
    assert nginx.count(f"ssl_certificate {qa};") == 1  # the QA host's server only
    assert "return 308 https://$host:8800$request_uri;" in nginx
    assert "proxy_ssl_name members.example.com;" in nginx
    assert "proxy_pass https://$changeover_pool;" in nginx
    apache = render(topo, "apache")
    assert "SSLProtocol -all +TLSv1.3" in apache and "Protocols http/1.1" in apache
    assert "ServerAlias *.shop.example.com" in apache
    assert f'SSLCertificateFile "{qa}"' in apache
    assert "[R=308,L]" in apache
    assert 'BalancerMember "https://127.0.0.1:9101"' in apache


def test_tls12_is_the_default_minimum_everywhere(tmp_path: Path) -> None:
    topo = topology(tls_settings(tmp_path, full=False))
    assert "ssl-min-ver TLSv1.2" in render(topo, "haproxy")
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in render(topo, "nginx")
    assert "SSLProtocol -all +TLSv1.2 +TLSv1.3" in render(topo, "apache")


def lines_with(text: str, word: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if word in line and not line.strip().startswith("#")
    ]


def test_haproxy_admissions_qa_and_sticky_routes() -> None:
    text = render(topology(route="r.1"), "haproxy", MIXED)
    assert "server a1 127.0.0.1:9101 weight 0" in text  # DRAINING: persistence only
    assert "server a2 127.0.0.1:9102 weight 1 disabled" in text  # OUT: maintenance
    assert "server a3 127.0.0.1:9103 weight 1\n" in text
    # Routes are regex literals: the dot of "r.1" matches only a dot.
    assert "use-server a1 if { req.cook(JSESSIONID) -m reg ^[^.]*[.]r[.]1$ }" in text
    assert "use_backend qa_a if qa_host_a" in text and "bind 127.0.0.1:8801" in text
    # QA backends never carry admissions.
    qa_a = text.split("backend qa_a", 1)[1].split("backend qa_b", 1)[0]
    assert "disabled" not in qa_a and "weight 0" not in qa_a
    assert "level admin expose-fd listeners" in text


def test_haproxy_counts_sticky_sessions_in_a_stick_table_expiring_at_session_idle() -> None:
    text = render(topology(), "haproxy", MIXED)
    live = text.split("\nbackend live\n", 1)[1].split("\nbackend ", 1)[0]
    track = "http-request track-sc0 req.cook(JSESSIONID) table sessions"
    assert track + " if { req.cook(JSESSIONID) -m found }" in live
    table = text.split("backend sessions", 1)[1]
    assert "stick-table type string len 200 size 100k expire 30000ms" in table


def test_every_product_takes_the_route_after_the_first_dot() -> None:
    """The extraction each template renders, applied to `<id>.rack.1`: `rack.1`."""
    cookie = "0123abcd.rack.1"
    haproxy = render(topology(route="rack.1"), "haproxy", MIXED)
    pattern = re.search(r"use-server a1 if \{ req\.cook\(JSESSIONID\) -m reg (\S+) \}", haproxy)
    assert pattern and re.search(pattern.group(1), cookie)
    assert not re.search(pattern.group(1), "0123abcd.x.rack.1")
    nginx = render(topology(route="rack.1"), "nginx", MIXED)
    extract = re.search(r'"~(\^\[\^\.\]\*[^"]+)" \$changeover_sfx', nginx)
    assert extract is not None
    found = re.match(extract.group(1).replace("(?<", "(?P<"), cookie)
    assert found and found.group("changeover_sfx") == "rack.1"
    assert "rack.1 sticky_a1;" in nginx
    # Apache's mod_proxy_balancer splits at the first dot itself (get_route: strchr).
    assert "route=rack.1 " in render(topology(route="rack.1"), "apache", MIXED)


def test_apache_status_flags_and_manager_on_loopback() -> None:
    text = render(topology(), "apache", MIXED)
    live = text.split('<Proxy "balancer://live">', 1)[1].split("</Proxy>", 1)[0]
    assert "route=a1 status=+N" in live and "route=a2 status=+D" in live
    assert "route=a3 hcmethod" in live
    qa = text.split('<Proxy "balancer://qa-a">', 1)[1].split("</Proxy>", 1)[0]
    assert "status=" not in qa
    assert "stickysession=JSESSIONID|jsessionid" in text
    assert "ServerName prod-a.example.com" in text
    manager = text.split('<Location "/balancer-manager">', 1)[1].split("</Location>", 1)[0]
    assert "Require ip 127.0.0.1 ::1" in manager


def test_apache_scoreboard_holds_a_new_generation_beside_a_full_old_one() -> None:
    """A graceful restart under load needs slots for a whole new generation while
    the old children finish; each generation starts half its workers at once and
    keeps them (no growing at a child a second, no killing of spare children)."""
    text = render(topology(), "apache", MIXED)
    mpm = {
        key: int(value)
        for key, value in re.findall(r"^(ServerLimit|ThreadsPerChild|MaxRequestWorkers|"
                                     r"StartServers|MaxSpareThreads) (\d+)$", text, re.M)
    }  # fmt: skip
    assert len(mpm) == 5, mpm
    generation = mpm["MaxRequestWorkers"] // mpm["ThreadsPerChild"]  # children
    assert mpm["ServerLimit"] >= 2 * generation
    assert 2 * mpm["StartServers"] >= generation
    assert mpm["MaxSpareThreads"] >= mpm["MaxRequestWorkers"]


def test_nginx_drain_is_a_route_map_and_out_is_nothing() -> None:
    text = render(topology(route="default"), "nginx", MIXED)
    sticky = text.split("map $changeover_route $changeover_sticky_pool {", 1)[1].split("}", 1)[0]
    # "default" is a map keyword: the route is escaped.
    assert "\\default sticky_a1;  # draining" in sticky
    assert "a2" not in sticky  # OUT: its sticky users go to the live pool
    # A sticky route is honoured while its cluster (index 0: a) is not flagged OUT.
    ok = text.split("map $changeover_route $changeover_sticky_ok {", 1)[1].split("}", 1)[0]
    assert "\\default $changeover_sticky_0;" in ok and "b1 $changeover_sticky_1;" in ok
    both = text.split("upstream new_11 {", 1)[1].split("}", 1)[0]
    assert "127.0.0.1:9101 max_fails=2 fail_timeout=1s down;  # a1 draining" in both
    assert "127.0.0.1:9103 max_fails=2 fail_timeout=1s;  # a3 live" in both
    assert "9111" not in text.split("upstream new_10 {", 1)[1].split("}", 1)[0]
    assert "upstream sticky_a2" not in text and "upstream qa_a2" in text
    assert '"admissions":{"a1":"draining","a2":"out","a3":"live","b1":"live"}' in text


def test_nginx_reads_cluster_flags_on_every_request() -> None:
    text = render(topology(), "nginx", options=RenderOptions(run_dir=Path("/srv/lb")))
    public = text.split("default_server", 1)[1].split("location /", 1)[0]
    assert "open_file_cache off;" in public
    assert "if (-f /srv/lb/state/a.no-new) {\n            set $changeover_new_0 0;" in public
    assert "if (-f /srv/lb/state/b.out) {\n            set $changeover_sticky_1 0;" in public
    assert "set $changeover_pool new_${changeover_new_0}${changeover_new_1};" in public
    assert '"clusters":{"a":{"new":$changeover_new_0,"sticky":$changeover_sticky_0}' in text
    # An instance's own state_dir wins; one nginx cannot read unquoted is refused.
    own = RenderOptions(instance=BalancerInstance(state_dir="/var/lib/lb-x"))
    assert "if (-f /var/lib/lb-x/a.out)" in render(topology(), "nginx", options=own)
    bad = RenderOptions(instance=BalancerInstance(state_dir="/var/lib/$lb"))
    with pytest.raises(RenderError, match="state_dir must be an absolute path"):
        render(topology(), "nginx", options=bad)


def test_nginx_refuses_more_clusters_than_it_renders_pools_for() -> None:
    clusters = [
        {"name": f"c{i}", "members": [{"name": f"m{i}", "port": 9200 + i}]} for i in range(7)
    ]
    with pytest.raises(RenderError, match="at most 6 clusters"):
        render(parse({"clusters": clusters}, Path("/x/changeover.toml")), "nginx")


def test_refusals_name_the_reason() -> None:
    with pytest.raises(RenderError, match="unknown member"):
        render(topology(), "haproxy", {"zz": OUT})
    with pytest.raises(RenderError, match="no template"):
        render(topology(), "traefik")
    with pytest.raises(RenderError, match=r"\$cookie_"):
        render(topology({"sticky_cookie": "my-session"}), "nginx")
    with pytest.raises(RenderError, match=r"HAProxy 2\.6 loads the key"):
        render(topology({"tls_cert": "/x/cert.pem", "tls_key": "/y/key.pem"}), "haproxy")


def test_a_site_template_directory_overrides_the_bundled_one(tmp_path: Path) -> None:
    (tmp_path / "nginx.cfg.j2").write_text("# site {{ site }}: {{ members | length }} members\n")
    options = RenderOptions(template_dir=tmp_path)
    assert render(topology(), "nginx", options=options) == "# site site: 4 members\n"


CHECK = {
    "haproxy": lambda conf, run: ["haproxy", "-c", "-f", str(conf)],
    "apache": lambda conf, run: ["apache2", "-t", "-f", str(conf)],
    "nginx": lambda conf, run: ["nginx", "-t", "-p", str(run), "-c", str(conf)],
}


@pytest.mark.real
@pytest.mark.parametrize("tls", ["plain", "tls", "every-tls-setting"])
@pytest.mark.parametrize("product", PRODUCTS)
def test_the_product_accepts_what_is_rendered(product: str, tls: str, tmp_path: Path) -> None:
    need(product)
    balancer: dict[str, Any] = {"algorithm": "least-conn"}
    if tls != "plain":
        balancer |= tls_settings(tmp_path, full=tls == "every-tls-setting")
    run_dir = tmp_path / "run"
    (run_dir / "tmp").mkdir(parents=True)
    text = render(topology(balancer), product, MIXED, options=RenderOptions(run_dir=run_dir))
    conf = tmp_path / f"{product}.conf"
    conf.write_text(text)
    result = subprocess.run(
        CHECK[product](conf, run_dir), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr + result.stdout


# --- the compiled templates kept between processes -------------------------------------


@pytest.fixture
def fresh_environments(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every render in the test builds its Jinja2 environment (and cache) anew."""
    from changeover.balancers import render as module

    module._environment.cache_clear()
    yield
    module._environment.cache_clear()


def test_a_rendered_template_is_kept_compiled_for_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_environments: None
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    text = render(topology(), "haproxy")
    cache = tmp_path / f"_jinja2-cache-{os.getuid()}"
    assert cache.stat().st_mode & 0o777 == 0o700
    assert [p.suffix for p in cache.iterdir()] == [".cache"]
    from changeover.balancers import render as module

    module._environment.cache_clear()  # as a new process would: loads the compiled code
    assert render(topology(), "haproxy") == text


def test_no_place_for_the_cache_costs_only_a_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_environments: None
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))  # no directory can be made here
    assert "backend live" in render(topology(), "haproxy")
    from changeover.balancers.render import _CompiledCache

    broken = _CompiledCache(str(blocked))  # a cache whose writes fail
    bucket = jinja2.bccache.Bucket(jinja2.Environment(), "k", "checksum")
    bucket.code = compile("x = 1", "t", "exec")
    broken.dump_bytecode(bucket)  # said nothing: the next process compiles again
