"""Services: carry out what the core decides (inference, training, deployments, keys, the outbox).

They are handed their dependencies (store, bus, registry, clock, metrics) and never import the gateway.
"""
