"""OpenAI Videos API routes (filled in by the OpenAI issue)."""

from starlette.routing import Route

routes: list[Route] = []
