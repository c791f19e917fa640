"""GenEvolve Studio: the Gradio app over the library.

``studio.app.build_app(services)`` builds the whole app from one :class:`studio.services.Services`;
the view modules (:mod:`studio.html`, :mod:`studio.distill`, :mod:`studio.bench`,
:mod:`studio.tables`) are pure functions from records to UI values, tested without launching.
The library (``genevolve``) never imports this package.
"""


class StudioError(ValueError):
    """Something the user asked for that cannot be done; the message says why and what to do."""
