"""Sub-commands of ``cpn``; each module has ``register(subparsers)`` (see controlplane/cli.py)."""
