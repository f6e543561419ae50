"""The ``signd`` command line."""
