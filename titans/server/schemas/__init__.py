"""Request and response bodies: `native` for the session API, `openai` for the OpenAI-compatible API."""
