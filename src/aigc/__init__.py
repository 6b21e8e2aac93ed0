"""aigc: a local-first text-generation workbench (prepare → train → generate → evaluate → serve)."""

__version__ = "0.1.0"
