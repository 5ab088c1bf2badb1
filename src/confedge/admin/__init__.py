"""The management listener (SPEC §1): status page, JSON status, Prometheus metrics, liveness.

See docs/MANAGEMENT.md for operators; `AdminService` is what the runtime starts.
"""

from __future__ import annotations

from confedge.admin.service import AdminService

__all__ = ["AdminService"]
