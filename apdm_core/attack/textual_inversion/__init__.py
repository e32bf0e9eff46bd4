"""Textual inversion: settings (``settings.TextualInversionSettings``) and the attack (``attack``)."""
