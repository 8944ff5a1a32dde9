"""The layering of docs/ARCHITECTURE.md: the data side never imports torch; the trainer never imports Beam."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_pipelines_never_import_torch():
    modules = imported_after("import mmae.pipelines.builder.pipeline, mmae.pipelines.demo.run, mmae.pipelines.builder.fetch, mmae.pipelines.builder.images")
    assert "torch" not in modules
    assert "cv2" not in modules  # heavy; the data side decodes with Pillow


def test_schemas_import_only_pyarrow_and_pydantic():
    modules = imported_after("import mmae.schemas, mmae.schemas.manifest")
    assert not {"torch", "apache_beam"} & modules


def test_trainer_never_imports_beam():
    assert "apache_beam" not in imported_after("import mmae.trainer, mmae.trainer.train, mmae.trainer.export")


def test_cli_help_is_light():
    assert not {"torch", "apache_beam"} & imported_after("import mmae.cli")
