"""The bird REST API (FastAPI). ``create_app(settings)`` builds it; see ``service.api.app``.

Part of the service layer: never imports torch, ray, bird_core or workers.
"""

from __future__ import annotations

from service.api.app import create_app

__all__ = ["create_app"]
