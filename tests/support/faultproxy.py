"""Tests use the fault proxy that ``cpn chaos`` uses (controlplane/tools/faultproxy.py)."""

from controlplane.tools.faultproxy import FaultProxy, Mode

__all__ = ["FaultProxy", "Mode"]
