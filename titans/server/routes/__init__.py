"""One APIRouter per resource: sessions, generation, memory, OpenAI-compatible, operations."""
