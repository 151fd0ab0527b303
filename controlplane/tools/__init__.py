"""Tools built on the parts: ``cpn up``, chaos, the fault proxy, ``cpn sim`` and the CLI's sub-commands."""
