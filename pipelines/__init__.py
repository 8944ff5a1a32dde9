"""Dataset building (`mmae build`) and data tooling.

Imports Beam, pyarrow, Pillow, img2dataset, sentencepiece, polars and fsspec; never torch.
"""

import os

# img2dataset imports albumentations, which checks PyPI for a newer release on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
