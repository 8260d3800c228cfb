"""Ansible inventories (INI and YAML) as changeover's members.

A faithful reader of Ansible's two static formats (`ini` and `yaml` inventory
plugins of ansible-core): groups, `children`, `vars`, host variables, ranges
(`web[01:18]`, `[a:f]`, `[1:9:2]`), `host:port`, and variable precedence as
Ansible computes it (the groups from the shallowest to the deepest, then by
`ansible_group_priority` and name, the host's own variables last). The YAML
syntax is parsed by PyYAML (safe loading); an INI line is split with `shlex`
and its values read with `ast.literal_eval`, as ansible-core itself does.
`tests/unit/test_inventory.py` compares the result with ansible-core's own
InventoryManager on the same files.

What it does not do (refused, never silently ignored): `group_vars/` and
`host_vars/` directories beside the file, dynamic inventories (scripts,
plugins), and Jinja2 templates in the variables changeover reads.
"""

from __future__ import annotations

import ast
import re
import shlex
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from changeover.config import read_regular

YAML_SUFFIXES = (".yml", ".yaml", ".json")  # ansible-core's yaml_valid_extensions
MAX_INVENTORY_BYTES = 4 << 20
MAX_RANGE_HOSTS = 10_000


class InventoryError(ValueError):
    """An inventory that cannot be read; the message names the file (and line)."""


@dataclass
class Group:
    name: str
    hosts: list[str] = field(default_factory=list)  # its own, in order of appearance
    children: list[str] = field(default_factory=list)
    parents: set[str] = field(default_factory=set)
    vars: dict[str, Any] = field(default_factory=dict)
    priority: int = 1  # ansible_group_priority: kept apart from the variables, as Ansible does

    def set(self, key: str, value: Any) -> None:
        if key != "ansible_group_priority":
            self.vars[key] = value
            return
        try:
            self.priority = int(value)
        except (TypeError, ValueError):
            raise InventoryError(
                f"group {self.name}: ansible_group_priority must be a number"
            ) from None


@dataclass
class Inventory:
    """The groups and hosts of one inventory file."""

    path: Path
    groups: dict[str, Group] = field(default_factory=dict)
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)  # the host's own

    def __post_init__(self) -> None:
        self.add_child("all", "ungrouped")  # there from the start, as in Ansible

    def group(self, name: str) -> Group:
        if name not in self.groups:
            self.groups[name] = Group(name)
        return self.groups[name]

    def add_host(self, group: str, host: str, variables: dict[str, Any]) -> None:
        g = self.group(group)
        if host not in g.hosts:
            g.hosts.append(host)
        self.host_vars.setdefault(host, {}).update(variables)

    def add_child(self, parent: str, child: str) -> None:
        if child == parent or parent in self.descendants(child):
            raise InventoryError(
                f"{self.path}: adding group {child!r} to {parent!r} makes a loop of children"
            )
        p = self.group(parent)
        if child not in p.children:
            p.children.append(child)
        self.group(child).parents.add(parent)

    def descendants(self, name: str) -> list[str]:
        """The group and every group below it, level by level, in file order."""
        order, queue, seen = [], [name], {name}
        while queue:
            current = queue.pop(0)
            order.append(current)
            for child in self.groups[current].children if current in self.groups else []:
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
        return order

    def ancestors(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = list(self.groups[name].parents) if name in self.groups else []
        while todo:
            g = todo.pop()
            if g not in found:
                found.add(g)
                todo.extend(self.groups[g].parents)
        return found

    def hosts_of(self, name: str) -> list[str]:
        """Every host in the group or a group below it, each once: its own in
        order, then each child's, level by level (Ansible's order for the group's
        own hosts and its children's; below that its order varies from run to run)."""
        out: list[str] = []
        for g in self.descendants(name):
            out.extend(h for h in self.groups[g].hosts if h not in out)
        return out

    def groups_of(self, host: str) -> set[str]:
        direct = {g.name for g in self.groups.values() if host in g.hosts}
        return direct.union(*(self.ancestors(g) for g in direct))

    def depth(self, name: str) -> int:
        """The longest chain of parents up to `all` (which is 0)."""
        parents = self.groups[name].parents
        return 0 if not parents else 1 + max(self.depth(p) for p in parents)

    def variables(self, host: str) -> dict[str, Any]:
        """The host's variables as Ansible combines them (default hash_behaviour: replace)."""

        def rank(name: str) -> tuple[int, int, str]:
            return self.depth(name), self.groups[name].priority, name

        out: dict[str, Any] = {}
        for g in sorted(self.groups_of(host), key=rank):
            out.update(self.groups[g].vars)
        out.update(self.host_vars.get(host, {}))
        return out

    def reconcile(self) -> None:
        """What Ansible does after parsing: every group under `all`, lone hosts in `ungrouped`."""
        for g in list(self.groups.values()):
            if g.name != "all" and not g.parents:
                self.add_child("all", g.name)
        ungrouped = self.groups["ungrouped"].hosts
        ungrouped[:] = [h for h in ungrouped if self.groups_of(h) <= {"all", "ungrouped"}]
        for host in self.host_vars:
            if self.groups_of(host) <= {"all"}:
                self.add_host("ungrouped", host, {})


# --- host patterns ----------------------------------------------------------------


def expand_range(pattern: str, where: str) -> list[str]:
    """`web[01:03]` -> web01, web02, web03 (Ansible's expand_hostname_range)."""
    if "[" not in pattern:
        return [pattern]
    head, _, rest = pattern.partition("[")
    body, close, tail = rest.partition("]")
    if not close:
        raise InventoryError(f"{where}: host range {pattern!r} has no closing ']'")
    bounds = body.split(":")
    if len(bounds) not in (2, 3):
        raise InventoryError(f"{where}: host range must be begin:end or begin:end:step")
    beg, end = bounds[0] or "0", bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not end:
        raise InventoryError(f"{where}: host range must specify end value")
    width = len(beg) if beg[0] == "0" and len(beg) > 1 else 0
    if width and width != len(end):
        raise InventoryError(f"{where}: host range must specify equal-length begin and end formats")
    try:
        step = int(step_text)
        if step < 1:
            raise ValueError
        if beg in string.ascii_letters and end in string.ascii_letters:
            i, j = string.ascii_letters.index(beg), string.ascii_letters.index(end)
            if i > j:
                raise InventoryError(f"{where}: host range must have begin <= end")
            seq = list(string.ascii_letters[i : j + 1 : step])
        else:
            seq = [str(n).zfill(width) for n in range(int(beg), int(end) + 1, step)]
    except ValueError:
        raise InventoryError(f"{where}: bad host range [{body}] in {pattern!r}") from None
    if len(seq) > MAX_RANGE_HOSTS:
        raise InventoryError(f"{where}: host range {pattern!r} has over {MAX_RANGE_HOSTS} hosts")
    out: list[str] = []
    for item in seq:
        out.extend(expand_range(f"{head}{item}{tail}", where))
    return out


_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")  # [::1] or [::1]:2222
_HOST_PORT = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])+):(\d+)$")  # name[1:3]:2222


def expand_pattern(pattern: str, where: str) -> tuple[list[str], int | None]:
    """(host names, port) from a host pattern: ranges expanded, `:port` split off."""
    pattern = pattern.strip()
    port: int | None = None
    if (m := _BRACKETED.match(pattern)) and ":" in m.group(1):  # IPv6, not a range
        return [m.group(1)], int(m.group(2)) if m.group(2) else None
    if m := _HOST_PORT.match(pattern):
        pattern, port = m.group(1), int(m.group(2))
    elif pattern.endswith(":"):
        raise InventoryError(f"{where}: host pattern {pattern!r} ends in ':' (reserved for a port)")
    elif re.sub(r"\[[^\]]*\]", "", pattern).count(":") > 1:
        return [pattern], None  # a bare IPv6 address
    return expand_range(pattern, where), port


# --- INI -----------------------------------------------------------------------------

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
_GROUP_NAME = re.compile(r"^([^:\]\s]+)\s*(?:#.*)?$")


def ini_value(text: str) -> Any:
    """A value as Ansible's INI plugin reads it: a Python literal if it is one, else text."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text
    if value is ... or isinstance(value, complex):
        return str(value) if value is not ... else "..."
    if isinstance(value, tuple | set):
        return list(value)
    return value


def parse_ini(text: str, inv: Inventory) -> None:
    group, state = "ungrouped", "hosts"
    pending: Pending = {}
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{inv.path}:{number}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if m := _SECTION.match(line):
            group, state = m.group(1), m.group(2) or "hosts"
            if state not in ("hosts", "children", "vars"):
                raise InventoryError(f"{where}: section [{group}:{state}] has an unknown type")
            if group not in inv.groups:
                if state == "vars" and group not in pending:
                    pending[group] = (number, state, [])
                inv.group(group)
            if group in pending and state != "vars":
                _add_pending(inv, group, pending)
            continue
        if line.startswith("[") and line.endswith("]"):
            raise InventoryError(f"{where}: invalid section {line!r} (no spaces in a section)")
        if state == "hosts":
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as exc:
                raise InventoryError(f"{where}: cannot split host line: {exc}") from None
            names, port = expand_pattern(tokens[0], where)
            variables: dict[str, Any] = {}
            for token in tokens[1:]:
                key, eq, value = token.partition("=")
                if not eq:
                    raise InventoryError(f"{where}: expected key=value, got {token!r}")
                variables[key] = ini_value(value)
            if port is not None:  # a variable of the line wins over the pattern's port
                variables = {"ansible_port": port, **variables}
            for name in names:
                inv.add_host(group, name, variables)
        elif state == "vars":
            key, eq, value = line.partition("=")
            if not eq:
                raise InventoryError(f"{where}: expected key=value, got {line!r}")
            inv.groups[group].set(key.strip(), ini_value(value.strip()))
        else:
            m = _GROUP_NAME.match(line)
            if not m:
                raise InventoryError(f"{where}: expected a group name, got {line!r}")
            child = m.group(1)
            if child in inv.groups:
                inv.add_child(group, child)
            elif child in pending:
                pending[child][2].append(group)
            else:
                pending[child] = (number, "children", [group])
    for name, (number, kind, parents) in pending.items():
        if kind == "vars":
            raise InventoryError(
                f"{inv.path}:{number}: section [{name}:vars] is for an undefined group {name!r}"
            )
        raise InventoryError(
            f"{inv.path}:{number}: section [{parents[-1]}:children] "
            f"includes an undefined group {name!r}"
        )


Pending = dict[str, tuple[int, str, list[str]]]  # group -> (line, state, parents)


def _add_pending(inv: Inventory, group: str, pending: Pending) -> None:
    _, kind, parents = pending.pop(group)
    if kind == "vars":
        return
    for parent in parents:
        inv.add_child(parent, group)
        if parent in pending and pending[parent][1] == "children":
            _add_pending(inv, parent, pending)


# --- YAML ----------------------------------------------------------------------------


def parse_yaml(text: str, inv: Inventory) -> None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise InventoryError(f"{inv.path}{line}: not valid YAML: {problem}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise InventoryError(f"{inv.path}: expected a mapping of groups at the top level")
    for name, body in data.items():
        _yaml_group(inv, str(name), body, name)


def _yaml_group(inv: Inventory, name: str, body: Any, where: str) -> str:
    if body is not None and not isinstance(body, dict):
        raise InventoryError(f"{inv.path}: group {where}: expected a mapping, got {body!r}")
    inv.group(name)
    for key, value in (body or {}).items():
        if isinstance(value, str) and key in ("vars", "children", "hosts"):
            value = {value: None}
        if value is None:
            continue
        if key not in ("vars", "children", "hosts"):
            raise InventoryError(
                f"{inv.path}: group {where}: unknown key {key!r} (expected hosts, children, vars)"
            )
        if not isinstance(value, dict):
            raise InventoryError(f"{inv.path}: group {where}.{key}: expected a mapping")
        if key == "vars":
            for var, var_value in value.items():
                inv.groups[name].set(str(var), var_value)
        elif key == "children":
            for child, child_body in value.items():
                inv.add_child(name, _yaml_group(inv, str(child), child_body, f"{where}.{child}"))
        else:
            for pattern, host_vars in value.items():
                if not isinstance(pattern, str):
                    raise InventoryError(
                        f"{inv.path}: group {where}.hosts: host {pattern!r} must be a string"
                    )
                if host_vars is not None and not isinstance(host_vars, dict):
                    raise InventoryError(
                        f"{inv.path}: host {pattern}: expected a mapping of variables"
                    )
                names, port = expand_pattern(pattern, f"{inv.path}: host {pattern}")
                variables = dict(host_vars or {})
                if port is not None:
                    variables = {"ansible_port": port, **variables}
                for host in names:
                    inv.add_host(name, host, variables)
    return name


# --- the file ------------------------------------------------------------------------


def read(path: Path) -> Inventory:
    """The inventory in `path` (YAML for .yml/.yaml/.json, else INI), reconciled."""
    for folder in ("group_vars", "host_vars"):
        if (path.parent / folder).is_dir():
            raise InventoryError(
                f"{path}: {path.parent / folder} is not read by changeover: "
                "move those variables into the inventory file"
            )
    try:
        raw = read_regular(path, MAX_INVENTORY_BYTES)
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such file") from None
    except ValueError as exc:
        raise InventoryError(f"{path}: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if raw.startswith(b"#!"):
        raise InventoryError(f"{path}: a script (dynamic inventory) is not read by changeover")
    inv = Inventory(path)
    try:
        if path.suffix.lower() in YAML_SUFFIXES:
            parse_yaml(text, inv)
        else:
            parse_ini(text, inv)
    except RecursionError:
        raise InventoryError(f"{path}: nested too deep") from None
    inv.reconcile()
    return inv


# --- clusters from groups ------------------------------------------------------------


class KeyedInventoryError(InventoryError):
    """An inventory problem about one key of changeover.toml (e.g. clusters[1].group)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _text(host: str, name: str, value: Any, inv: Inventory) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise InventoryError(f"{inv.path}: host {host}: {name} must be text, got {value!r}")
    if "{{" in str(value) or "{%" in str(value):
        raise InventoryError(
            f"{inv.path}: host {host}: {name} = {value!r} is a Jinja2 template, "
            "which changeover does not render: give the value itself"
        )
    return str(value)


def _number(host: str, name: str, value: Any, inv: Inventory) -> int:
    text = _text(host, name, value, inv)
    if not text.isdigit():
        raise InventoryError(
            f"{inv.path}: host {host}: {name} must be a port number, got {value!r}"
        )
    return int(text)


def member(
    host: str, variables: dict[str, Any], port: int | None, inv: Inventory
) -> dict[str, Any]:
    """A `[[clusters]]` member from an inventory host: its name, `ansible_host`,
    `ansible_port` and `ansible_user` (for SSH), `changeover_port` (the
    application's port, else the cluster's `member_port`) and `changeover_route`."""
    out: dict[str, Any] = {"name": host, "host": host}
    if "ansible_host" in variables:
        out["host"] = _text(host, "ansible_host", variables["ansible_host"], inv)
    if "changeover_port" in variables:
        out["port"] = _number(host, "changeover_port", variables["changeover_port"], inv)
    elif port is not None:
        out["port"] = port
    else:
        raise InventoryError(
            f"{inv.path}: host {host} has no changeover_port variable and its cluster "
            "no member_port: expected the port its application listens on"
        )
    if "changeover_route" in variables:
        out["route"] = _text(host, "changeover_route", variables["changeover_route"], inv)
    if "ansible_port" in variables:
        out["ssh_port"] = _number(host, "ansible_port", variables["ansible_port"], inv)
    if "ansible_user" in variables:
        out["ssh_user"] = _text(host, "ansible_user", variables["ansible_user"], inv)
    return out


def with_members(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data` (a parsed changeover.toml) with each cluster's `group` expanded into
    its `members` from `[site] inventory`; the file is untouched without one."""
    clusters = data.get("clusters")
    site = data.get("site")
    source = site.get("inventory") if isinstance(site, dict) else None
    grouped = (
        [i for i, c in enumerate(clusters) if isinstance(c, dict) and c.get("group") is not None]
        if isinstance(clusters, list)
        else []
    )
    if source is None:
        if grouped:
            raise KeyedInventoryError(
                f"clusters[{grouped[0]}].group", "needs [site] inventory: the file it names"
            )
        return data
    if not isinstance(source, str):
        raise KeyedInventoryError("site.inventory", "expected the path of an inventory file")
    if not grouped:
        raise KeyedInventoryError(
            "site.inventory", 'no cluster names a group: give each cluster group = "..."'
        )
    try:
        inv = read(base / source)
    except InventoryError as exc:
        raise KeyedInventoryError("site.inventory", str(exc)) from None
    assert isinstance(clusters, list)
    out = [dict(c) if isinstance(c, dict) else c for c in clusters]
    for i in grouped:
        cluster = out[i]
        key = f"clusters[{i}]"
        name = cluster["group"]
        if "members" in cluster:
            raise KeyedInventoryError(f"{key}.members", "give either members or group, not both")
        if not isinstance(name, str) or name not in inv.groups:
            known = ", ".join(sorted(inv.groups))
            raise KeyedInventoryError(
                f"{key}.group", f"no group {name!r} in {inv.path} (its groups: {known})"
            )
        hosts = inv.hosts_of(name)
        if not hosts:
            raise KeyedInventoryError(f"{key}.group", f"group {name!r} in {inv.path} has no hosts")
        port = cluster.get("member_port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise KeyedInventoryError(f"{key}.member_port", f"expected a port number, got {port!r}")
        try:
            cluster["members"] = [member(h, inv.variables(h), port, inv) for h in hosts]
        except InventoryError as exc:
            raise KeyedInventoryError(f"{key}.group", str(exc)) from None
    return {**data, "clusters": out}
