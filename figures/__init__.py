"""Paper-style figures and the report behind ``saf figures``."""

__all__: list[str] = []
