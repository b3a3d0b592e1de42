"""Placeholder: the Mesh client is being written; capability.py imports Mesh lazily from here."""


class Mesh:
    """Handle to the mesh (placeholder)."""
