"""The HTTP routes, one router per resource: `models` (models and health), `completions` (chat and text
completions, plain and streaming), `sessions` (the persistent session resource)."""
from . import completions, models, sessions

ROUTERS = [models.router, completions.router, sessions.router]
