"""HTTP serving: an OpenAI-compatible completions API and a web playground over one loaded run."""

from aigc.serve.app import create_app

__all__ = ["create_app"]
