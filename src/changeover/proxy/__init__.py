"""The embedded balancer: an asyncio reverse proxy for the live pool and QA entry points.

routing.py   pure routing decisions (sticky routes, drain, fallback, QA, RR/least-conn)
state.py     admissions and health shared with the workers; persistence
protocol.py  the hot path: client and upstream connections of one worker
health.py    active (and passive) health checks, in the master
admin.py     the admin API, in the master
server.py    run(): master, workers, listeners, TLS, reload, shutdown
handover.py  a binary upgrade: listeners and state passed to a new master (SCM_RIGHTS)
"""
