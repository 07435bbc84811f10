"""The OpenAI-compatible HTTP server: request schemas, metrics, runtime builder, app and uvicorn wrapper."""
