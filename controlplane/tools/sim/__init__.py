"""``cpn sim``: the national network on a simulated clock, driven by the hub's own pure core.

Layout of the package (engine modules are named ``core_*`` and are pure, checked by
tests/unit/test_import_rules.py: no asyncio, aiohttp, nats, sqlite, time or random):

- ``core_scenario``  the scenario schema (TOML, frozen msgspec Structs) and its decoding;
- ``core_workload``  inference arrivals (tidal, per origin weight) and training job draws;
- ``core_inference`` replicas via ``replicas.plan_replicas``, requests via ``router.Router.route``,
                     baselines (random, round-robin) and the oracle RTT, on the same request stream;
- ``core_training``  jobs via ``scheduler.plan`` and ``lifecycle``; baselines (nearest hub, random pool);
- ``core_engine``    the event loop tying them together and the report as plain data;
- ``runner``         seeds the random streams, reads layouts and scenario files, times the run;
- ``report`` / ``plots``  text table, stable JSON, PNG plots (the CLI writes the files).
"""
