"""`balcony-edge serve`: an OpenAI-compatible HTTP server over the engine (starlette and uvicorn)."""
