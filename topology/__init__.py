"""The network's shape as data: layout schema and validation (``layout``, ``fileformat``), file
reading (``loader``, the only I/O), the latency graph and per-origin RTT rankings (``latency``),
coverage analysis (``coverage``), synthetic layouts for scale (``synth``).

Pure: nothing here imports asyncio, aiohttp, nats, SQLite, time or random, and nothing here imports
``controlplane`` or ``edge_agent``.
"""
