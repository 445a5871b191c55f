"""``python -m cli``: the ``bird`` command line."""

from cli.app import app

app()
