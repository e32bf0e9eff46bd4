"""PersGuard (arXiv 2502.16167): settings (``settings.PersGuardSettings``) and losses (``loss.PersGuard``)."""
