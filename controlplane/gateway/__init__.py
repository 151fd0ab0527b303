"""The HTTP gateway (aiohttp): the only hub code that imports aiohttp's server.

One module per API area; errors are mapped to HTTP in one middleware (app.py).
"""
