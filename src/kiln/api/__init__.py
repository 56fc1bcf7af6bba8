"""HTTP: FastAPI routes, auth and the one place exceptions become OpenAI-shaped error responses."""
