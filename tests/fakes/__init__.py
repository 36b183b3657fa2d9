"""Fakes held to the contracts of the parts they stand in for (see each module)."""
