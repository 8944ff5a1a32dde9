"""mmae: multimodal masked autoencoder pretraining toolkit.

The product's three halves live in the repository's top-level folders `schemas/`,
`pipelines/` and `trainer/`, and are installed under this package (`mmae.schemas`,
`mmae.pipelines`, `mmae.trainer`) by a package-dir mapping, so they cannot clash with other
distributions' modules. In a checkout that is not installed, the folders beside this package
are found the same way (below).
"""

import os as _os

__version__ = "0.1.0"

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_checkout, name, "__init__.py")) for name in ("schemas", "pipelines", "trainer")):
    __path__.append(_checkout)  # noqa: F821 - a package's own __path__
