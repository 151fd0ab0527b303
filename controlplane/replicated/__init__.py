"""The replicated record and the controller lease, on NATS JetStream (issue #13, the foundation).

- :mod:`.kv` (the only module here that imports ``nats``): :class:`~.kv.Record`, one JetStream KV
  bucket with 3 replicas; create / compare-and-set update / get with revision; atomic multi-key
  commits (JetStream atomic batch publish) optionally fenced by a leader epoch; a watch.
- :mod:`.projection`: an in-memory read model kept current by watching the record, rebuilt from it
  on start, with ``wait_for(revision)`` for reading one's own writes.
- :mod:`.lease_rules`: the leader lease's decisions as pure functions of an injected ``now``.
- :mod:`.lease`: :class:`~.lease.LeaderElector`, carrying those rules out against the record.
- :mod:`.errors`: ``Conflict``, ``Fenced``, ``NoQuorum``, ``NotFound``.

See docs/architecture.md, "The replicated record and the leader".
"""
