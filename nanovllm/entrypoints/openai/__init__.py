"""The OpenAI-compatible HTTP server: protocol.py (request bodies, response and chunk bodies), server.py (the FastAPI
app and `run_server`)."""
