"""The probe: an open-loop traffic generator with sticky virtual users that
proves a release caused no failed request, broken or cut session or version flap,
and WebSocket users that prove it closed no WebSocket abnormally.

`python -m changeover.probe URL --rate R --duration S --sticky-users U` runs it
as a separate process (see `changeover.probe.command`).
"""

from changeover.probe.accounting import SessionLengths
from changeover.probe.command import WebSocketOptions, main_cli
from changeover.probe.report import FAILURE_KINDS, ProbeReport
from changeover.probe.runner import failure_kind, run_probe
from changeover.probe.watcher import AdmissionWatcher

__all__ = [
    "FAILURE_KINDS",
    "AdmissionWatcher",
    "ProbeReport",
    "SessionLengths",
    "WebSocketOptions",
    "failure_kind",
    "main_cli",
    "run_probe",
]
