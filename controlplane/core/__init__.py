"""The pure core: decisions over plain data. No I/O, no clock (``now`` is an argument), no event loop.

Imports only the core itself, ``edge_agent.wire`` and ``topology`` (tests/unit/test_import_rules.py).
"""
