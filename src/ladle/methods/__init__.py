"""Merge methods: each module holds one method's math; the engine does the rest."""
