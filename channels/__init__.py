"""The built-in channels, one module each, registered in the `streamplex.channels` entry-point group by pyproject.toml."""
