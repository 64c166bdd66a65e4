"""graft-trio: an embeddable workflow engine and distributed job runner for trio, replicated by Raft."""

__version__ = "0.1.0"
