"""Failpoints at the proxy's level (placeholder until shim/probe/failpoints.py is merged)."""

from __future__ import annotations

from shim.proxy import record
from shim.proxy.events import EVENT_PASS, EventVerdict
from shim.proxy.forward import PASS, Verdict


class Perturbations:
    def __init__(self, trace: record.TraceFile | None, target_path: str) -> None:
        self._trace = trace
        self._target_path = target_path

    def request(self, cid: str, exec_id: str, method: str, msg: object) -> Verdict:
        return PASS

    def event(self, cid: str, topic: str) -> EventVerdict:
        return EVENT_PASS
