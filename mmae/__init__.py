"""mmae: multimodal masked autoencoder pretraining toolkit.

The product's halves live in the repository's top-level folders `schemas/`, `pipelines/` and
`trainer/` and install under this package as `mmae.schemas`, `mmae.pipelines` and
`mmae.trainer`: one `package-dir` mapping in pyproject.toml, honoured by the wheel and by the
editable install (`make install`), so no generic module name lands in site-packages and every
import reads `from mmae.trainer.loader import ...` (the file trainer/loader.py). See
docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
