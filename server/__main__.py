"""`python -m server`: the same as `streamplex serve`."""

from server.cli import serve

serve()
