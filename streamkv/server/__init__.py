"""`streamkv serve`: an OpenAI-compatible HTTP server with persistent, endless streaming sessions.

app.py (routes, OpenAI errors) · schemas.py (request bodies) · sessions.py (residency, leases, turns) ·
store.py (SQLite + snapshots) · commands.py (the CLI subcommand). See docs/server.md.
"""
