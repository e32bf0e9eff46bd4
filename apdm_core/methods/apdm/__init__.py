"""APDM (arXiv 2511.01307): settings (``settings.APDMSettings``) and losses (``loss.APDM``)."""
