"""Shared test helpers (fixture factories that build small real artefacts)."""
