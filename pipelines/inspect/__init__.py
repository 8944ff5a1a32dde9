"""Inspecting a built dataset: `mmae stats` (tables, JSON, HTML report) and `mmae validate`."""
