"""The reefcap captioning HTTP service: the FastAPI app, its batching and admission limits, metrics, the feedback
store (SQLite or PostgreSQL), one process or ``--workers N`` under a supervisor, or a Ray Serve deployment."""
