"""The NATS adapter: the hub's bus, NATS identities and server configs, certificates, the embedded server.

The only hub code that imports ``nats``.
"""
