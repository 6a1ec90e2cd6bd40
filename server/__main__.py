"""`python -m streamplex.server`: the same as `streamplex serve`."""

from streamplex.server.cli import serve

serve()
