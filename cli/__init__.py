"""The ``bird`` command line (:mod:`cli.app`), one module per command group."""
