"""The commented starter topology that `changeover init` writes."""

STARTER = """\
# changeover.toml: one site, two (or more) completely separate clusters.
# Durations are seconds or strings such as "500ms", "30s", "10m".

[site]
name = "web-prod"
state_dir = ".changeover"          # the journal (SQLite) and the release lock

# Each cluster is a separate set of application servers. A member (host and
# port) or a route may belong to one cluster only.
[[clusters]]
name = "a"
qa_host = "prod-a.example.com"     # Host header that reaches cluster a only
qa_port = 8081                      # ...and/or a port that reaches it only
members = [
  { name = "a1", host = "10.0.1.11", port = 8080, route = "a1" },
  { name = "a2", host = "10.0.1.12", port = 8080, route = "a2" },
]

[[clusters]]
name = "b"
qa_host = "prod-b.example.com"
qa_port = 8082
members = [
  { name = "b1", host = "10.0.2.11", port = 8080, route = "b1" },
  { name = "b2", host = "10.0.2.12", port = 8080, route = "b2" },
]

[balancer]
driver = "builtin"                  # builtin | haproxy | apache | nginx
listen = "0.0.0.0:80"               # the public live pool
admin_listen = "127.0.0.1:8089"     # builtin admin API (bearer token)
admin_token_env = "CHANGEOVER_ADMIN_TOKEN"
sticky_cookie = "JSESSIONID"        # JSESSIONID=<id>.<route>, the Apache way
algorithm = "round-robin"           # or least-conn
# tls_cert = "/etc/ssl/site.pem"    # TLS termination: give both or neither
# tls_key = "/etc/ssl/site.key"
# tls_load = "handshake"            # nginx: renew certificates without a reload

[balancer.health]
path = "/health"
interval = "1s"
rise = 2
fall = 2

[executor]
kind = "local"                      # local | ssh
parallel = 0                        # members of a cluster at once; 0 = all
max_failed = 0
timeout = "2m"                      # per command

# Commands run on each member. {version} {member} {host} {port} {cluster}
# {route} are substituted as single literal arguments, never as shell code.
[release]
stop = "/opt/app/bin/ctl stop"
deploy = "/opt/app/bin/ctl deploy {version}"
start = "/opt/app/bin/ctl start"

[checks]
health_path = "/health"
version_path = "/version"           # must contain the released version
smoke = [ { path = "/", status = 200 } ]
# smoke_command = "./qa-smoke.sh"   # run with CHANGEOVER_QA_URL set

[policy]
strategy = "rolling-clusters"
# order = ["a", "b"]
drain_timeout = "5m"
session_idle = "30s"                 # a session silent this long is over (drains wait for it)
health_timeout = "5m"
approval = "auto"                   # or "manual": `changeover approve`
min_healthy = 2                     # healthy members the live pool never goes below
"""
