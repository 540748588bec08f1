"""argus-agent: the per-host daemon that lets Argus rerun and stop training runs."""

__version__ = "0.1.0"
