"""nginx loading its certificates at every handshake (tls_load = "handshake"):
the rendered config, and the pure parts of a renewal (names, copies, what is kept)."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from changeover.balancers.base import BalancerError
from changeover.balancers.host import LocalHost
from changeover.balancers.nginxtls import (
    CURRENT,
    CertificateStore,
    carried,
    check_name,
    copies,
    first_certificate,
    served_name,
    stale,
    version_name,
)
from changeover.balancers.render import RenderOptions, render
from changeover.config import parse
from changeover.tls import CertFiles
from tests.certs import issue
from tests.integration.realbalancers import need

SHOP = CertFiles(Path("/c/shop.pem"), Path("/c/shop.key"), ("*.shop.test", "shop.test"))
SITE = CertFiles(Path("/c/site.pem"), Path("/c/site.key"))


def site(tls_load: str = "handshake") -> dict[str, Any]:
    return {
        "clusters": [
            {"name": "a", "qa_host": "qa-a.test", "members": [{"name": "a1", "port": 9001}]},
            {"name": "b", "qa_port": 9100, "members": [{"name": "b1", "port": 9002}]},
        ],
        "balancer": {
            "driver": "nginx",
            "listen": "127.0.0.1:8443",
            "admin_listen": "127.0.0.1:8089",
            "tls_cert": "/c/site.pem",
            "tls_key": "/c/site.key",
            "tls_load": tls_load,
            "tls_hosts": [
                {"names": ["shop.test"], "cert": "/c/shop.pem", "key": "/c/shop.key"},
                {"names": ["qa-a.test"], "cert": "/c/qa.pem", "key": "/c/qa.key"},
            ],
        },
    }


def rendered(data: dict[str, Any], run_dir: Path = Path("/srv/lb"), **extra: Any) -> str:
    topology = parse(data, Path("/x/changeover.toml"))
    return render(topology, "nginx", options=RenderOptions(run_dir=run_dir, extra=extra))


def certificate_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("ssl_cert")]


def test_every_tls_server_loads_its_pair_per_handshake_from_the_current_version() -> None:
    text = rendered(site())
    shop, qa = (CertFiles(Path(), Path(), (name,)).label for name in ("shop.test", "qa-a.test"))
    lines = certificate_lines(text)
    # The public default server, shop.test's copy, the QA host's server, the QA
    # port's server: each names its pair by label under the resolved link.
    for label, count in (("default", 2), (shop, 1), (qa, 1)):
        assert lines.count(f"ssl_certificate $changeover_tls_dir/{label}.pem;") == count
        assert lines.count(f"ssl_certificate_key $changeover_tls_dir/{label}.key;") == count
    assert "/c/" not in "".join(lines)  # the configured files are never read by nginx
    assert text.count("root /srv/lb/state/tls/current;") == 4
    # The link resolved once per handshake: a map of $realpath_root, kept per request.
    assert re.search(
        r"map \$ssl_server_name \$changeover_tls_dir \{\s+default \$realpath_root;", text
    )
    # The check server: a reserved name per label, served from the staged version.
    assert 'server_name "~^[a-z0-9-]+\\.tls-check\\.changeover\\.invalid$";' in text
    assert "root /srv/lb/state/tls/staging;" in text
    assert "ssl_certificate $changeover_tls_dir/$changeover_tls_label.pem;" in lines
    assert '"tls":"handshake"' in text


def test_the_check_rendering_names_a_versions_files_literally() -> None:
    text = rendered(site(), tls_check_dir="/srv/lb/state/tls/v1")
    lines = certificate_lines(text)
    assert lines and all(
        re.fullmatch(r"ssl_certificate(_key)? /srv/lb/state/tls/v1/\S+;", x) for x in lines
    )
    assert "$realpath_root" not in text and "root /srv" not in text


def test_loaded_with_the_config_by_default() -> None:
    text = rendered(site("config"))
    assert "ssl_certificate /c/site.pem;" in certificate_lines(text)
    assert "$changeover_tls_dir" not in text and "tls-check" not in text
    assert '"tls":"config"' in text


@pytest.mark.real
def test_nginx_accepts_both_renderings(tmp_path: Path) -> None:
    """Certificates named by variables are not read by `nginx -t` (the driver's
    check names a version's files literally, which nginx -t then loads)."""
    need("nginx")
    run_dir = tmp_path / "run"
    (run_dir / "tmp").mkdir(parents=True)
    ca = trustme.CA()
    version = tmp_path / "v1"
    data = site()
    data["balancer"] |= {"tls_hosts": []}
    pair = issue(ca, version, "default", "site.test")
    pair.key.rename(version / "default.key")
    for extra in ({}, {"tls_check_dir": str(version)}):
        conf = tmp_path / "nginx.conf"
        conf.write_text(rendered(data, run_dir, **extra))
        result = subprocess.run(
            ["nginx", "-t", "-p", str(run_dir), "-c", str(conf)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_labels_are_stable_file_and_host_names() -> None:
    assert SITE.label == "default"
    assert re.fullmatch(r"host-[0-9a-f]{12}", SHOP.label)
    moved = CertFiles(Path("/elsewhere.pem"), Path("/k"), ("*.shop.test",))
    assert moved.label == SHOP.label  # named by its first name, not its place or files
    assert CertFiles(Path(), Path(), ("shop.test",)).label != SHOP.label


def test_a_renewal_copies_every_pair_into_its_version() -> None:
    assert copies([SITE, SHOP], "/t/v1") == [
        ("/c/site.pem", "/t/v1/default.pem"),
        ("/c/site.key", "/t/v1/default.key"),
        ("/c/shop.pem", f"/t/v1/{SHOP.label}.pem"),
        ("/c/shop.key", f"/t/v1/{SHOP.label}.key"),
    ]
    # A pair the serving version has and the new one lacks (a tls_hosts entry
    # removed) is carried over until the reload that follows.
    assert carried(["default", "host-1", "host-2"], ["default", "host-2"]) == ["host-1"]
    assert carried(["default"], ["default", "host-3"]) == []


def test_names_a_check_asks_for() -> None:
    assert check_name("host-0a") == "host-0a.tls-check.changeover.invalid"
    assert served_name(SITE) == ""  # no SNI: the default server
    assert served_name(SHOP) == "changeover-check.shop.test"  # a name under the wildcard


def test_versions_sort_by_time_and_only_older_ones_go() -> None:
    first = version_name(dt.datetime(2026, 1, 2, 3, 4, 5), "0123abcd")
    assert first == "v20260102T030405-0123abcd"
    later = version_name(dt.datetime(2026, 1, 2, 3, 4, 6))
    assert later > first and len(later) == len(first)
    old = version_name(dt.datetime(2025, 1, 1), "ffffffff")
    names = [first, later, old, "staging", "current", "lost+found"]
    assert stale(names, keep=[later, first]) == [old]
    assert stale(names, keep=[later, None]) == sorted([first, old])


def test_the_certificate_a_client_is_served_is_the_files_first(tmp_path: Path) -> None:
    pair = issue(trustme.CA(), tmp_path, "site", "site.test")
    text = pair.cert.read_text()
    assert first_certificate(text) == pair.der
    assert first_certificate(pair.key.read_text() + text) == pair.der  # key first: still
    with pytest.raises(ValueError, match="no PEM certificate"):
        first_certificate(pair.key.read_text())


def version_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.is_symlink())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_version_is_staged_searchable_with_each_file_left_as_its_owner_made_it(
    tmp_path: Path,
) -> None:
    """The store's commands on this host (the same argv run over SSH): under a
    umask that would hide them, the directories stay searchable by nginx's
    workers; each copy keeps its file's mode; a source that is missing leaves
    no version behind; pruning keeps the versions named."""
    pair = issue(trustme.CA(), tmp_path / "certs", "site", "site.test")
    pair.key.chmod(0o640)
    files = [CertFiles(pair.cert, pair.key)]
    store = CertificateStore(LocalHost(), str(tmp_path / "state" / "tls"), timeout=10)
    root = Path(store.root)
    umask = os.umask(0o077)
    try:
        first = await store.stage(files, dt.datetime(2026, 1, 1))
        with pytest.raises(BalancerError, match="cannot stat"):
            await store.stage([CertFiles(tmp_path / "gone.pem", pair.key)], dt.datetime(2026, 1, 2))
    finally:
        os.umask(umask)
    assert mode(root) == mode(Path(first.path)) == 0o755
    assert mode(Path(first.path) / "default.key") == 0o640
    assert version_dirs(root) == [first.name]
    assert (root / "staging").readlink() == Path(first.name)
    assert first.served == {"default": pair.der}
    assert await store.labels("staging") == ["default"]
    assert await store.target(CURRENT) is None and await store.labels() is None
    await store.point(CURRENT, first)
    assert await store.labels() == ["default"]
    second = await store.stage(files, dt.datetime(2026, 1, 3))
    third = await store.stage(files, dt.datetime(2026, 1, 4))
    await store.prune(keep=[third.name, second.name])
    assert version_dirs(root) == [second.name, third.name]
