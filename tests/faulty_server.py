"""The real caption app under uvicorn with one extra route that has a bug, for tests of how a 500 leaves.

Run as ``python faulty_server.py MODEL PORT FEEDBACK_DB``. ``GET /v1/bug`` raises ZeroDivisionError inside the
app (behind the same middleware as every route); everything else is the app ``reefcap serve`` runs.
"""

from __future__ import annotations

import sys


def main() -> None:
    import uvicorn

    from reefcap.server.app import create_app
    from reefcap.server.settings import ServerSettings

    model, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    settings = ServerSettings(
        _env_file=None, model=model, fallback=None, backend="torch", device="cpu", feedback_db=db, inference_threads=1
    )
    app = create_app(settings)

    async def bug() -> dict:
        return {"never": 1 // 0}

    app.add_api_route("/v1/bug", bug, methods=["GET", "POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
