"""STOW-RS (PS3.18 10.5): a second way in, to the same store, completeness timer, routing and
audit as C-STORE; the response reports each instance's failure with its reason."""

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
