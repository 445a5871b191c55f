"""Alembic migrations of bird's schema (run them with ``service.db.upgrade``)."""
