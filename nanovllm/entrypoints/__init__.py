"""Online entry points: AsyncLLM (the engine behind an asyncio API) and the OpenAI-compatible HTTP server
(`nanovllm serve`, needs the `serve` extra: fastapi and uvicorn are imported only by the server modules)."""
